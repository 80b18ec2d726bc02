# How much, and when, a ControlNet steers: the demo's canny ControlNet (python -m train.demo_controlnet writes it)
# swept over its scale and the share of the steps it acts on, on one held-out character's edge map.
#   python -m train.demo_controlnet && python -m sampling.ablate --config configs/ablation_controlnet.py
config = dict(
    model="plainxl-tiny",
    prompts=["1girl, solo, blue hair, long hair, red eyes, smile, white background"],
    controlnets=["runs/demo_controlnet/run/controlnet"],
    control_images=["runs/demo_controlnet/held/edges/0000.png"],
    grid=dict(sampler=["euler_a"], steps=[20], cfg=[5.0], control_scale=[0.0, 0.5, 1.0, 1.5],
              control_start=[0.0], control_end=[0.3, 0.6, 1.0], seed=[0, 1]),
    width=64,
    height=64,
)
