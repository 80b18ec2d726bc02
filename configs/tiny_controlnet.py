# A canny ControlNet for the bundled tiny model (task="controlnet", train/controlnet.py): procedural characters the
# model draws anyway, each with its canny edge map; train.demo_controlnet writes them and measures the result.
#   python -m train.demo_controlnet
config = dict(
    model="plainxl-tiny",
    task="controlnet",
    instance_data_dir="runs/demo_controlnet/images",  # each image's caption in the .txt beside it
    control_dir="runs/demo_controlnet/edges",
    prior_loss_weight=0.0,
    resolution=64,
    center_crop=True,
    random_flip=True,  # the edge map flips with its image
    batch_size=8,
    max_steps=5000,
    lr=3e-4,
    weight_decay=0.0,
    checkpoint_every=500,
    keep_checkpoints=1,
    export_dtype="fp32",
    output_dir="runs/demo_controlnet/run",
)
