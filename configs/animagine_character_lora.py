# LoRA DreamBooth of one anime character on animagine-xl-4.0: the same loop and data as
# animagine_character.py, with rank-32 adapters on kohya's default UNet set over a bf16 base. The
# full-size step is estimated at 11.6 GiB on the meta device (tests/benchmarks/bench_train_step.py; not
# yet measured on a GPU): a 16 GB GPU should do.
#   python -m train.dreambooth --config configs/animagine_character_lora.py --instance_data_dir=my_character
#   python -m sampling.generate --model cagliostrolab/animagine-xl-4.0 --lora runs/my_character_lora/lora.safetensors \
#       --prompt "1girl, sks, solo, smile, beach" --dtype fp16 --device cuda
config = dict(
    model="cagliostrolab/animagine-xl-4.0",
    instance_data_dir="data/my_character",  # 5-20 images; a .txt beside an image is its prompt
    instance_prompt="1girl, sks, solo",
    class_data_dir="data/class_1girl",
    class_prompt="1girl, solo",
    num_class_images=200,
    prior_loss_weight=1.0,
    resolution=1024,
    batch_size=1,
    grad_accum=2,
    max_steps=800,
    lr=1e-4,  # kohya's usual LoRA rate; full fine-tuning uses about 1/50 of it
    lr_schedule="constant",
    warmup_steps=50,
    train=["unet"],
    lora_rank=32,
    lora_alpha=32,
    base_dtype="bf16",
    mixed_precision="bf16",
    gradient_checkpointing=True,
    checkpoint_every=200,
    validation_prompt="1girl, sks, solo, smile, outdoors, masterpiece, high score, great score, absurdres",
    validation_every=200,
    snr_gamma=5.0,
    output_dir="runs/my_character_lora",
)
