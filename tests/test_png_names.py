"""PNGs from other tools: AUTOMATIC1111 1.10 / 1.8, Forge and ComfyUI parameters, written by hand in each tool's
format (sampling/names.py, sampling/pnginfo.py, sampling/comfyui.py), read into the sampler and schedule they
name; those we can follow are re-run by `--from-png` on the bundled model, and equal the same run from flags.
"""

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sampling.comfyui import parse_comfyui
from sampling.generate import main
from sampling.names import DIFFUSERS_SAMPLERS, SAMPLER_NAMES, SCHEDULE_NAMES, read_sampler
from sampling.pnginfo import format_parameters, parse_parameters
from sampling.settings import Settings

TAIL = "CFG scale: 7, Seed: 5, Size: 64x64, Model hash: 31e35c80fc, Model: sd_xl_base_1.0"
A1111 = [  # (the parameters line's sampler part, what it reads as (sampler, schedule), written by)
    ("Sampler: DPM++ 2M, Schedule type: Karras", ("dpmpp_2m", "karras"), "A1111 1.10"),
    ("Sampler: Euler a, Schedule type: Automatic", ("euler_ancestral", "normal"), "A1111 1.10"),
    ("Sampler: DPM++ 3M SDE, Schedule type: Automatic", ("dpmpp_3m_sde", "exponential"), "A1111 1.10"),
    ("Sampler: DPM++ 2M SDE, Schedule type: Exponential", ("dpmpp_2m_sde", "exponential"), "A1111 1.10"),
    ("Sampler: DPM++ 2M SDE Heun, Schedule type: Karras", ("dpmpp_2m_sde_heun", "karras"), "A1111 1.10"),
    ("Sampler: DPM++ SDE, Schedule type: Karras", ("dpmpp_sde", "karras"), "A1111 1.10"),
    ("Sampler: DPM++ 2S a, Schedule type: Simple, ENSD: 31337", ("dpmpp_2s_ancestral", "simple"), "A1111 1.10"),
    ("Sampler: DPM2 a, Schedule type: Beta, Beta schedule alpha: 0.6, Beta schedule beta: 0.6",
     ("dpm_2_ancestral", "beta"), "A1111 1.10"),
    ("Sampler: DPM2, Schedule type: Align Your Steps", ("dpm_2", "align_your_steps"), "A1111 1.10"),
    ("Sampler: Heun, Schedule type: KL Optimal", ("heun", "kl_optimal"), "A1111 1.10"),
    ("Sampler: LMS, Schedule type: Uniform", ("lms", "normal"), "A1111 1.10"),
    ("Sampler: Euler, Schedule type: DDIM", ("euler", "ddim_uniform"), "A1111 1.10"),
    ("Sampler: LCM, Schedule type: SGM Uniform", ("lcm", "sgm_uniform"), "A1111 1.10"),
    ("Sampler: UniPC, Schedule type: Automatic", ("uni_pc", "normal"), "A1111 1.10"),
    ("Sampler: UniPC, Schedule type: Automatic, UniPC variant: bh2", ("uni_pc_bh2", "normal"), "A1111 1.10"),
    ("Sampler: DDIM, Schedule type: Automatic", ("ddim", "default"), "A1111 1.10"),
    ("Sampler: Euler a, Schedule type: Automatic, Eta: 0.5, Sigma noise: 0.9", ("euler_ancestral", "normal"),
     "A1111 1.10"),
    ("Sampler: DPM++ 2M Karras", ("dpmpp_2m", "karras"), "A1111 1.8"),
    ("Sampler: DPM++ SDE Karras", ("dpmpp_sde", "karras"), "A1111 1.8"),
    ("Sampler: DPM++ 2M SDE Heun Exponential", ("dpmpp_2m_sde_heun", "exponential"), "A1111 1.8"),
    ("Sampler: LMS Karras", ("lms", "karras"), "A1111 1.8"),
    ("Sampler: k_dpmpp_2m, Schedule type: karras", ("dpmpp_2m", "karras"), "A1111 1.8 (k_sched_type)"),
    ("Sampler: DDPM, Schedule type: Normal", ("ddpm", "normal"), "Forge"),
    ("Sampler: Euler a, Schedule type: SGM Uniform, Distilled CFG Scale: 3.5", ("euler_ancestral", "sgm_uniform"),
     "Forge"),
    ("Sampler: DPM++ 2M SDE, Schedule type: Karras, Module 1: sdxl_vae", ("dpmpp_2m_sde", "karras"), "Forge"),
]
A1111_REFUSED = [
    ("Sampler: Restart, Schedule type: Karras", "sampler 'Restart' is not one of"),
    ("Sampler: DPM adaptive", "sampler 'DPM adaptive' is not one of"),
    ("Sampler: Euler, Schedule type: Polyexponential", "schedule type 'Polyexponential' is not implemented"),
    ("Sampler: Euler, Schedule type: Align Your Steps GITS", "'Align Your Steps GITS' is not implemented"),
    ("Sampler: Euler, Schedule type: Beta, Beta schedule alpha: 0.5", "'Beta schedule alpha: 0.5' is not implemented"),
]


@pytest.mark.parametrize("part, expected, tool", A1111)
def test_a1111_and_forge_samplers_read(part, expected, tool):
    settings, _ = parse_parameters(f"1girl\nNegative prompt: lowres\nSteps: 20, {part}, {TAIL}")
    assert (settings.sampler, settings.schedule, settings.karras) == (*expected, False), tool
    if "Eta:" in part:
        assert (settings.eta, settings.s_noise) == (0.5, 0.9)


@pytest.mark.parametrize("part, fragment", A1111_REFUSED)
def test_a1111_samplers_we_lack_are_refused(part, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_parameters(f"1girl\nSteps: 20, {part}, {TAIL}")


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("schedule", ["default", *SCHEDULE_NAMES])
def test_every_pair_round_trips_through_a1111_labels(sampler, schedule):
    s = Settings(prompt="x", width=64, height=64, sampler=sampler, schedule=schedule,
                 eta=0.5 if sampler in ("euler_ancestral", "dpmpp_3m_sde") else 1.0)
    parsed, _ = parse_parameters(format_parameters(s, 0, "m"))
    expected = schedule if schedule != "default" or sampler in DIFFUSERS_SAMPLERS else "normal"
    assert (parsed.sampler, parsed.schedule, parsed.eta, parsed.karras) == (sampler, expected, s.eta, False)


def test_diffusers_karras_and_k_diffusion_karras_stay_apart():
    diffusers_karras = Settings(prompt="x", width=64, height=64, sampler="dpmpp_2m", karras=True)
    k_karras = Settings(prompt="x", width=64, height=64, sampler="dpmpp_2m", schedule="karras")
    for s in (diffusers_karras, k_karras):
        text = format_parameters(s, 0, "m")
        assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
        assert parse_parameters(text)[0] == s
    assert read_sampler("Euler a") == ("euler_ancestral", "normal")  # A1111's Automatic, not diffusers' schedule


def comfyui_graph(**changes):
    """A plain SDXL text-to-image graph with one LoRA, as ComfyUI's SaveImage writes its 'prompt' chunk."""
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors", "strength_model": 0.8,
                                                      "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 6, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "denoise": 1.0, "model": ["10", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    for key, value in changes.items():
        graph[key] = value
    return graph


ADVANCED = {"class_type": "KSamplerAdvanced", "inputs": {
    "add_noise": "enable", "noise_seed": 5, "steps": 6, "cfg": 7.0, "sampler_name": "uni_pc_bh2",
    "scheduler": "beta", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable",
    "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
SDXL_TEXT = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
    "clip": ["4", 1], "width": 2048, "height": 1536, "crop_w": 0, "crop_h": 32, "target_width": 64,
    "target_height": 64, "text_g": "a red fox in snow", "text_l": "a red fox in snow"}}
SDXL_TWO_TEXTS = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
    **SDXL_TEXT["inputs"], "text_l": "a red fox in snow", "text_g": "a fox, oil painting"}}
SDXL_NEGATIVE = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
    **SDXL_TEXT["inputs"], "width": 512, "height": 384, "text_l": "blurry", "text_g": "blurry"}}
CLIP_SKIP_1 = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -3, "clip": ["10", 1]}}
COMFYUI = [  # (graph, what it reads as)
    (comfyui_graph(), dict(sampler="dpmpp_2m", schedule="karras", loras=[("style.safetensors", 0.8)])),
    (comfyui_graph(**{"3": ADVANCED}), dict(sampler="uni_pc_bh2", schedule="beta", loras=None)),
    (comfyui_graph(**{"6": SDXL_TEXT}), dict(sampler="dpmpp_2m", schedule="karras", original_size=(1536, 2048),
                                              crop_top_left=(32, 0))),
    (comfyui_graph(**{"6": SDXL_TWO_TEXTS, "7": SDXL_NEGATIVE}),  # text_l, text_g: prompt, prompt_2 (diffusers')
     dict(prompt_2="a fox, oil painting", negative_original_size=(384, 512), negative_prompt_2=None)),
    (comfyui_graph(**{"12": CLIP_SKIP_1, "6": {"class_type": "CLIPTextEncode",
                                               "inputs": {"text": "a red fox in snow", "clip": ["12", 0]}},
                      "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["12", 0]}}}),
     dict(clip_skip=1)),
    (comfyui_graph(**{"11": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
                      "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["11", 0]}}}),
     dict(vae="sdxl_vae.safetensors")),
    (comfyui_graph(**{"12": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2,
                                                                          "clip": ["10", 1]}},
                      "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["12", 0]}}}),
     dict(negative_prompt="")),
]
CONTROLNET = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0], "control_net": ["20", 0],
                                                          "image": ["21", 0], "strength": 1.0}}
COMFYUI_REFUSED = [
    (comfyui_graph(**{"13": CONTROLNET, "3": {**comfyui_graph()["3"], "inputs": {
        **comfyui_graph()["3"]["inputs"], "positive": ["13", 0]}}}), "ControlNetApply node on its positive path"),
    (comfyui_graph(**{"3": {**comfyui_graph()["3"], "inputs": {**comfyui_graph()["3"]["inputs"], "denoise": 0.6}}}),
     "denoises 0.6 of the schedule"),
    (comfyui_graph(**{"30": comfyui_graph()["3"]}), "with 2 sampler nodes"),
    (comfyui_graph(**{"3": {**comfyui_graph()["3"], "inputs": {**comfyui_graph()["3"]["inputs"],
                                                              "sampler_name": "dpm_adaptive"}}}),
     "sampler 'dpm_adaptive' / scheduler 'karras' is not implemented"),
    (comfyui_graph(**{"12": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -1,
                                                                          "clip": ["4", 1]}},
                      "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["12", 0]}}}),
     "stops at layer -1"),
    (comfyui_graph(**{"12": CLIP_SKIP_1, "6": {"class_type": "CLIPTextEncode",
                                               "inputs": {"text": "x", "clip": ["12", 0]}}}),
     "read different CLIP layers"),
    (comfyui_graph(**{"10": {**comfyui_graph()["10"], "inputs": {**comfyui_graph()["10"]["inputs"],
                                                                "strength_clip": 1.0}}}), "merges a LoRA at one scale"),
]


@pytest.mark.parametrize("graph, expected", COMFYUI)
def test_comfyui_graphs_read(graph, expected):
    settings, recorded = parse_comfyui(json.dumps(graph))
    assert (settings.prompt, settings.negative_prompt, settings.steps, settings.cfg, settings.seed) == \
        ("a red fox in snow", expected.get("negative_prompt", "blurry"), 6, 7.0, 5)
    assert recorded["Model"] == "sd_xl_base_1.0.safetensors"
    assert settings.clip_skip == expected.get("clip_skip")
    for key in ("sampler", "schedule", "original_size", "crop_top_left", "prompt_2", "negative_original_size",
                "negative_prompt_2"):
        if key in expected:
            assert getattr(settings, key) == expected[key], key
    if "loras" in expected:
        assert recorded.get("Loras") == expected["loras"]
    if "vae" in expected:
        assert recorded["VAE"] == expected["vae"]


@pytest.mark.parametrize("graph, fragment", COMFYUI_REFUSED)
def test_comfyui_graphs_we_cannot_follow_are_named(graph, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_comfyui(json.dumps(graph))


def png(path, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    return path


@pytest.mark.slow
def test_every_readable_fixture_reruns_like_its_settings(tmp_path):
    """Each fixture above that reads is re-run by --from-png on the bundled model, and its image equals the Python
    pipeline's for the settings the fixture stands for (so its sampler, schedule, eta and seed reached the run)."""
    from dataclasses import replace

    from sampling.pipeline import Pipeline

    pipe = Pipeline.load("plainxl-tiny")
    fixtures = [(f"a{i}", png(tmp_path / f"a{i}.png", parameters=f"1girl\nNegative prompt: lowres\nSteps: 4, {part}, "
                 f"{TAIL}")) for i, (part, _, _) in enumerate(A1111)]
    fixtures += [(f"c{i}", png(tmp_path / f"c{i}.png", prompt=json.dumps(graph))) for i, (graph, _) in enumerate(COMFYUI)]
    for name, path in fixtures:
        out = tmp_path / name
        # --model: the PNGs name SDXL checkpoints (and LoRAs) this machine lacks; a --model of ours takes neither
        assert main(["--from-png", str(path), "--model", "plainxl-tiny", "--out", str(out)]) == 0, name
        image = sorted(out.iterdir())[0]
        text = path.read_bytes() and Image.open(path).info
        settings, _ = parse_parameters(text["parameters"]) if "parameters" in text else parse_comfyui(text["prompt"])
        expected = pipe(replace(settings, width=64, height=64, num_images=1), progress=False)[0]
        assert np.array_equal(np.asarray(Image.open(image)), np.asarray(expected)), name


def test_negative_size_conditions_round_trip():
    s = Settings(prompt="x", negative_prompt="y", width=64, height=64, negative_original_size=(512, 384),
                 negative_crop_top_left=(8, 16), negative_target_size=(64, 64))
    text = format_parameters(s, 0, "m")
    assert "Negative original size: 384x512, Negative crop top left: 8x16, Negative target size: 64x64" in text
    assert parse_parameters(text)[0] == s


def test_diffusers_clip_skip_round_trips_under_its_own_key():
    """Not A1111's "Clip skip" (which A1111 does not apply to SDXL, and so is left alone here)."""
    s = Settings(prompt="x", negative_prompt="y", width=64, height=64, clip_skip=2)
    text = format_parameters(s, 0, "m")
    assert "Diffusers clip skip: 2" in text and parse_parameters(text)[0] == s
    a1111 = text.replace("Diffusers clip skip: 2", "Clip skip: 2")
    assert parse_parameters(a1111)[0].clip_skip is None
