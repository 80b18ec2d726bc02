"""A ComfyUI PNG's `prompt` text chunk (its API-format graph) -> the settings of the same generation, for --from-png.

The graph is {node id: {"class_type": ..., "inputs": {name: value or [source id, output index]}}}. Followed:
a plain text-to-image graph, backwards from its one sampler node:

    KSampler / KSamplerAdvanced (from step 0 to the end, noise added)  seed, steps, cfg, sampler_name, scheduler
      .model        -> LoraLoader* -> CheckpointLoaderSimple (ckpt_name)        the model and its LoRAs
      .positive, .negative -> CLIPTextEncode (text) or CLIPTextEncodeSDXL      the prompts, SDXL size conditions
      .latent_image -> EmptyLatentImage (width, height, batch_size)
    VAEDecode.vae   -> the checkpoint's VAE, or VAELoader (vae_name)

Anything else on those paths (ControlNet, img2img's VAEEncode, conditioning arithmetic, a model patch) is named
in one line as the node this cannot follow. Where ComfyUI's conventions differ from ours, the settings are ours:
image i of a batch uses seed + i (ComfyUI draws the whole batch from one generator, so only image 0 matches); the
negative prompt is encoded even when empty (as ComfyUI does); (word:1.2) weights are read AUTOMATIC1111's way.
"""

import json

from sampling.names import SAMPLER_NAMES, SCHEDULE_NAMES
from sampling.settings import Settings

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")


def _node(graph, link, what):
    """The node a link [source id, output index] points at -> (class_type, inputs); ValueError if it is not a link."""
    if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in graph):
        raise ValueError(f"its {what} input is not a link to a node of the graph")
    node = graph[str(link[0])]
    return node.get("class_type"), node.get("inputs", {})


def _cannot_follow(kind, where):
    return ValueError(f"it is a ComfyUI graph with a {kind} node on its {where} path, which --from-png cannot follow "
                      "(it re-runs plain text-to-image graphs: checkpoint, LoRAs, text encoders, empty latent, "
                      "KSampler, VAE decode)")


def _clip_skip(graph, link, where):
    """The text encoders a prompt went through (the checkpoint's, through LoRA loaders) -> the clip skip they read
    at: CLIPSetLastLayer's stop_at_clip_layer -(k + 2) is diffusers' clip_skip k (-2, SDXL's own layer: None). The
    node nearest the text encoder is the one ComfyUI applied last."""
    kind, inputs = _node(graph, link, f"{where} clip")
    skip, found = None, False
    while kind in ("LoraLoader", "CLIPSetLastLayer"):
        if kind == "CLIPSetLastLayer" and not found:
            layer = inputs.get("stop_at_clip_layer")
            if not isinstance(layer, int) or layer > -2:
                raise ValueError(f"its CLIPSetLastLayer stops at layer {layer}; SDXL reads the penultimate layer, -2, "
                                 "or one before it (-3, -4, ...: plainxl's clip skip), not the last")
            skip, found = (None if layer == -2 else -2 - layer), True
        kind, inputs = _node(graph, inputs.get("clip"), f"{where} clip")
    if kind != "CheckpointLoaderSimple":
        raise _cannot_follow(kind, f"{where} clip")
    return skip


def _text(graph, link, where):
    """A conditioning link -> (CLIP-L's text, bigG's own text or None, SDXL size conditions, clip skip).
    CLIPTextEncodeSDXL's text_l and text_g are diffusers' prompt and prompt_2."""
    kind, inputs = _node(graph, link, where)
    if kind not in ("CLIPTextEncode", "CLIPTextEncodeSDXL"):
        raise _cannot_follow(kind, where)
    skip = _clip_skip(graph, inputs.get("clip"), where)
    if kind == "CLIPTextEncode":
        return inputs.get("text", ""), None, {}, skip
    sizes = dict(original_size=(inputs["height"], inputs["width"]),
                 crop_top_left=(inputs.get("crop_h", 0), inputs.get("crop_w", 0)),
                 target_size=(inputs["target_height"], inputs["target_width"]))
    text_l, text_g = inputs.get("text_l", ""), inputs.get("text_g", "")
    return text_l, (text_g if text_g != text_l else None), sizes, skip


def _model(graph, link):
    """Follow the model input back through LoRA loaders to the checkpoint -> (checkpoint name, [(lora, scale)])."""
    loras = []
    kind, inputs = _node(graph, link, "model")
    while kind == "LoraLoader":
        if inputs.get("strength_model") != inputs.get("strength_clip"):
            raise ValueError(f"its LoRA {inputs.get('lora_name')} has strength_model {inputs.get('strength_model')} "
                             f"and strength_clip {inputs.get('strength_clip')}; plainxl merges a LoRA at one scale")
        loras.insert(0, (inputs["lora_name"], float(inputs["strength_model"])))
        kind, inputs = _node(graph, inputs.get("model"), "model")
    if kind != "CheckpointLoaderSimple":
        raise _cannot_follow(kind, "model")
    return inputs["ckpt_name"], loras


def _sampler_node(graph):
    """The graph's one sampler node's inputs, with KSamplerAdvanced's in KSampler's names; ValueError otherwise."""
    samplers = [node for node in graph.values() if node.get("class_type") in SAMPLER_NODES]
    if len(samplers) != 1:
        raise ValueError(f"it is a ComfyUI graph with {len(samplers)} sampler nodes; --from-png follows a graph with "
                         "one KSampler (a plain text-to-image run)")
    node, inputs = samplers[0], dict(samplers[0].get("inputs", {}))
    if node["class_type"] == "KSamplerAdvanced":
        whole = (inputs.get("add_noise") == "enable" and inputs.get("start_at_step") == 0
                 and inputs.get("end_at_step", 0) >= inputs.get("steps", 0))
        if not whole:
            raise ValueError("its KSamplerAdvanced runs part of a schedule (start/end step, no noise): a two-stage "
                             "graph, which --from-png cannot follow")
        inputs["seed"], inputs["denoise"] = inputs.get("noise_seed"), 1.0
    if inputs.get("denoise", 1.0) != 1.0:
        raise ValueError(f"its KSampler denoises {inputs['denoise']} of the schedule (img2img), which --from-png "
                         "cannot follow: the graph does not say which image it started from")
    return inputs


def parse_comfyui(text):
    """A ComfyUI `prompt` chunk -> (Settings, {"Model", "Loras", "VAE"}), or ValueError naming what it cannot follow."""
    try:
        graph = json.loads(text)
    except ValueError:
        raise ValueError("its 'prompt' chunk is not JSON") from None
    if not isinstance(graph, dict) or not all(isinstance(node, dict) for node in graph.values()):
        raise ValueError("its 'prompt' chunk is not a ComfyUI graph")
    try:
        return _settings(graph)
    except KeyError as e:
        raise ValueError(f"its graph has no {e} input where a plain text-to-image graph has one") from None


def _settings(graph):
    inputs = _sampler_node(graph)
    sampler, schedule = inputs.get("sampler_name"), inputs.get("scheduler")
    if sampler not in SAMPLER_NAMES or schedule not in SCHEDULE_NAMES:
        raise ValueError(f"its sampler {sampler!r} / scheduler {schedule!r} is not implemented here: the samplers "
                         f"are {', '.join(SAMPLER_NAMES)}; the schedules {', '.join(SCHEDULE_NAMES)}")
    kind, latent = _node(graph, inputs.get("latent_image"), "latent_image")
    if kind != "EmptyLatentImage":
        raise _cannot_follow(kind, "latent_image")
    prompt, prompt_2, sizes, skip = _text(graph, inputs.get("positive"), "positive")
    negative, negative_2, negative_sizes, negative_skip = _text(graph, inputs.get("negative"), "negative")
    if skip != negative_skip:
        raise ValueError(f"its positive and negative prompts read different CLIP layers (clip skip {skip} and "
                         f"{negative_skip}); plainxl reads both at one")
    model, loras = _model(graph, inputs.get("model"))
    settings = Settings(prompt=prompt, negative_prompt=negative, prompt_2=prompt_2, negative_prompt_2=negative_2,
                        width=int(latent["width"]), height=int(latent["height"]), clip_skip=skip,
                        num_images=int(latent.get("batch_size", 1)), steps=int(inputs["steps"]),
                        cfg=float(inputs["cfg"]), sampler=sampler, schedule=schedule, seed=int(inputs["seed"]),
                        **sizes, **{f"negative_{k}": v for k, v in negative_sizes.items()})
    recorded = {"Model": model}
    if loras:
        recorded["Loras"] = loras
    decoders = [node for node in graph.values() if node.get("class_type") == "VAEDecode"]
    if len(decoders) == 1:
        kind, vae = _node(graph, decoders[0].get("inputs", {}).get("vae"), "vae")
        if kind == "VAELoader":
            recorded["VAE"] = vae["vae_name"]
    return settings, recorded
