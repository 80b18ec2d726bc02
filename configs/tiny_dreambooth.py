# DreamBooth on the bundled tiny model: a character it has never seen (heterochromia and a star hairpin,
# five images written by train.demo), identifier "sks", class "1girl". train.demo runs it four times, with
# prior preservation on (as here) and off (--prior_loss_weight=0), each as full fine-tuning and as LoRA, and measures them.
#   python -m train.demo
config = dict(
    model="plainxl-tiny",
    instance_data_dir="runs/demo/instance",
    instance_prompt="1girl, sks",
    class_data_dir="runs/demo/class",
    class_prompt="1girl",
    num_class_images=200,
    prior_loss_weight=1.0,
    train=["unet"],
    resolution=64,
    center_crop=True,
    random_flip=False,  # a flip would swap the subject's eye colours
    cache_latents=True,
    batch_size=4,
    max_steps=300,
    lr=2e-4,
    weight_decay=0.0,
    class_steps=20,
    checkpoint_every=300,
    keep_checkpoints=1,
    export_dtype="fp32",
    output_dir="runs/demo/prior",
)
