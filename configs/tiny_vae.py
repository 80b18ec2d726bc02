# Stage 1 of the bundled tiny model: its VAE, trained on procedural portraits with the DreamBooth loop's "vae" task.
#   python -m models.init tiny runs/tiny/random.safetensors
#   python -c "from data.procedural import write_dataset; write_dataset('runs/tiny/vae_portraits', 6000, widened=True)"
#   python -m train.dreambooth --config configs/tiny_vae.py
config = dict(
    task="vae",
    model="runs/tiny/random.safetensors",
    instance_data_dir="runs/tiny/vae_portraits",  # every accessory and heterochromia too: the VAE is a codec
    prior_loss_weight=0.0,
    train=["vae"],
    resolution=64,
    center_crop=True,
    random_flip=False,  # a flip would swap the eyes of heterochromia characters
    batch_size=16,
    max_steps=1500,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=20,
    kl_weight=1e-6,
    checkpoint_every=250,
    export_dtype="fp32",
    output_dir="runs/tiny/vae",
)
