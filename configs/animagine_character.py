# DreamBooth of one anime character on animagine-xl-4.0 (one or more 24+ GB GPUs).
#   torchrun --nproc_per_node=2 -m train.dreambooth --config configs/animagine_character.py
# Any field can be overridden on the command line: --max_steps=1200 --instance_data_dir=my_character
config = dict(
    model="cagliostrolab/animagine-xl-4.0",
    instance_data_dir="data/my_character",  # 5-20 images; a .txt beside an image is its prompt
    instance_prompt="1girl, sks, solo",  # "sks" is a rare token here; any rare tag works
    class_data_dir="data/class_1girl",
    class_prompt="1girl, solo",
    num_class_images=200,
    prior_loss_weight=1.0,
    resolution=1024,
    batch_size=1,
    grad_accum=2,
    max_steps=800,
    lr=2e-6,
    lr_schedule="constant",
    warmup_steps=50,
    train=["unet"],
    mixed_precision="bf16",
    gradient_checkpointing=True,
    checkpoint_every=200,
    validation_prompt="1girl, sks, solo, smile, outdoors, masterpiece, high score, great score, absurdres",
    validation_every=200,
    snr_gamma=5.0,
    output_dir="runs/my_character",
)
