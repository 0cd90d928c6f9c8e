"""Where one decode step's time goes, each part against the weight-streaming bound measured in the same run.

    python bench/bench_decode_parts.py [--preset minimind-v1-small] [--steps 100] [--training_layout]

The bound is one matrix-vector product over all the weights (as in bench_model.py). Against it: a real
decode step (batch 1, KV cache, last-token logits), the weight products that step performs alone on one row
(in the decoding layout of `MiniMindLM.use_decoding_layout` unless --training_layout), and the same products as
torch.mv. The gap between the step and its products is everything else (norms, RoPE, attention, cache
writes, Python); the gap between the products and the bound is the cost of many small products.
"""
import argparse

import torch
from common import best_time, machine, table, weight_passes

from model.generate import KVCache
from model.LMConfig import preset_config
from model.model import MiniMindLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-v1-small")
    parser.add_argument("--steps", type=int, default=100, help="decode steps per timing")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--training_layout", action="store_true", help="skip model.use_decoding_layout()")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    model = MiniMindLM(preset_config(args.preset)).eval()
    if not args.training_layout:
        model.use_decoding_layout()
    # The weights one step multiplies, as the model does it: wq/wk/wv as one product where they are fused.
    fused = {m for layer in model.layers if layer.attention.qkv_fused()
             for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv)}
    weights_used = [layer.attention.wqkv for layer in model.layers if layer.attention.qkv_fused()]
    weights_used += [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in fused]
    rows = [torch.randn(1, 1, w.shape[1]) for w in weights_used]
    bound_pass = weight_passes(model)["mv"]
    cache = KVCache.for_model(model, 1, args.prompt + args.steps + 1)
    token = torch.tensor([[5]])

    def decode_steps():
        cache.lengths = [args.prompt] * len(cache.lengths)  # rewind: every timing decodes the same positions
        for p in range(args.prompt, args.prompt + args.steps):
            model(token, cache=cache, position_ids=torch.tensor([[p]]), logits_to_keep=1)

    def linear_layers():
        for w, x in zip(weights_used, rows):
            torch.nn.functional.linear(x, w)

    def matrix_vector():
        for w, x in zip(weights_used, rows):
            torch.mv(w, x.view(-1))

    with torch.inference_mode():
        model(torch.randint(3, model.config.vocab_size, (1, args.prompt)), cache=cache,
              position_ids=torch.arange(args.prompt)[None])
        bound = best_time(bound_pass, repeats=20, warmup=3)
        parts = [("one mv over all weights (bound, baseline)", bound),
                 (f"decode step (mean of {args.steps})", best_time(decode_steps, repeats=3) / args.steps),
                 (f"the {len(rows)} weight products alone, one row", best_time(linear_layers, repeats=20, warmup=3)),
                 (f"the same {len(rows)} products as torch.mv", best_time(matrix_vector, repeats=20, warmup=3))]
    table([(name, f"{t * 1e3:.2f}", f"{t / bound:.2f}") for name, t in parts], ("part", "ms per token", "vs bound"))
    step, lin = parts[1][1], parts[2][1]
    print(f"\ndecode step reaches {bound / step:.0%} of the bound; outside the weight products: {(step - lin) * 1e3:.2f} ms "
          f"({(step - lin) / step:.0%} of the step)")


if __name__ == "__main__":
    main()
