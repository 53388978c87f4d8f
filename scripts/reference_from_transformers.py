#!/usr/bin/env python3
"""Write the same stage tensors as `blip2 inspect`, computed by Hugging Face transformers, for comparison
with scripts/compare.py. Needs torch, transformers, pillow, numpy and safetensors (not installed on the
project's build machines, which have no PyPI access: run it where those are available).

    scripts/reference_from_transformers.py --model DIR --image cat.png --prompt "" --decoder-input-ids 0 --out ref.safetensors
    blip2 inspect --model DIR --image cat.png --prompt "" --decoder-input-ids 0 --out ours.safetensors
    scripts/compare.py ours.safetensors ref.safetensors

Preprocessing is written out with Pillow (BICUBIC resize to 224², /255, CLIP mean/std), exactly what the
BLIP-2 processor does, so that the comparison does not depend on which image processor a transformers
version picks by default.
"""
import argparse

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--decoder-input-ids", default="0")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    model = Blip2ForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    size = model.config.vision_config.image_size
    img = Image.open(a.image).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float64) / 255.0).astype(np.float32)
    pixels = torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy()).unsqueeze(0)

    tok = AutoTokenizer.from_pretrained(a.model)
    text = tok(a.prompt, return_tensors="pt")
    dec = torch.tensor([[int(t) for t in a.decoder_input_ids.split(",")]])
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.query_tokens.expand(1, -1, -1)
        qformer = model.qformer(query_embeds=queries, encoder_hidden_states=vision).last_hidden_state
        projection = model.language_projection(qformer)
        embeds = torch.cat([projection, model.get_input_embeddings()(text.input_ids)], dim=1)
        mask = torch.cat([torch.ones(projection.shape[:2], dtype=torch.long), text.attention_mask], dim=1)
        lm = model.language_model
        encoder = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = lm(encoder_outputs=(encoder,), attention_mask=mask, decoder_input_ids=dec).logits
    tensors = {
        "vision_last_hidden_state": vision,
        "qformer_last_hidden_state": qformer,
        "language_projection": projection,
        "encoder_last_hidden_state": encoder,
        "logits": logits,
    }
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
