"""Where one decode step's time goes, each part against the weight-streaming bound measured in the same run.

    python bench/bench_decode_parts.py [--preset minimind-v1-small] [--steps 100] [--rows 1] [--plain]

The bound is one matrix-vector product over all the weights (as in bench_model.py). Against it: a real
decode step of the engine (model/engine.py; products tuned for this CPU unless --plain), the weight products
that step performs alone, in the tuned form, and the same products as F.linear and as torch.mv. The gap between
the step and its products is everything else (norms, RoPE, attention, cache writes, Python); the gap between the
products and the bound is the cost of many small products.
"""
import argparse

import torch
import torch.nn.functional as F
from common import best_time, machine, table, weight_passes

from model import quiet_third_party

quiet_third_party()  # before transformers loads: its import-time notices mean nothing to a user

from model.engine import PRODUCTS, DecodeLinear, Engine
from model.LMConfig import preset_config
from model.model import MiniMindForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-v1-small")
    parser.add_argument("--steps", type=int, default=100, help="decode steps per timing")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1, help="rows decoded together")
    parser.add_argument("--plain", action="store_true", help="no product tuning: every product as F.linear")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(preset_config(args.preset)).eval()
    engine = Engine(model, tune=not args.plain)
    if engine.tuning:
        print("tuned products: " + ", ".join(f"{n} row(s): {choice}" for n, (choice, _) in engine.tuning.items()))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(args.rows, m.in_features) for m in linears]
    bound_pass = weight_passes(model)["mv"]
    cache = engine.new_cache(args.rows, args.prompt + args.steps + 1)
    tokens = torch.full((args.rows,), 5)

    def decode_steps():
        for row in range(args.rows):  # rewind: every timing decodes the same positions
            cache.set_row(row, 0, args.prompt)
        for _ in range(args.steps):
            engine.decode(cache, tokens)

    def products(form):
        def run():
            for m, x in zip(linears, inputs):
                form(m, x)
        return run

    tuned = products(lambda m, x: m(x))
    as_linear = products(lambda m, x: F.linear(x, m.weight))
    as_mv = products(lambda m, x: torch.mv(m.weight, x[0]))
    with torch.inference_mode():
        engine.prefill(cache, 0, [[7] * args.prompt] * args.rows)
        bound = best_time(bound_pass, repeats=20, warmup=3)
        form = (DecodeLinear.one if args.rows == 1 else DecodeLinear.few) if args.plain else \
            engine.tuning[1 if args.rows == 1 else 16][0]
        parts = [("one mv over all weights (bound, baseline)", bound),
                 (f"decode step, {args.rows} row(s) (mean of {args.steps})", best_time(decode_steps, repeats=3) / args.steps),
                 (f"the {len(linears)} weight products alone, as the step runs them ({form})",
                  best_time(tuned, repeats=20, warmup=3)),
                 ("the same products as F.linear", best_time(as_linear, repeats=20, warmup=3))]
        if args.rows == 1:
            parts.append(("the same products as torch.mv", best_time(as_mv, repeats=20, warmup=3)))
    table([(name, f"{t * 1e3:.2f}", f"{t / bound:.2f}") for name, t in parts], ("part", "ms per step", "vs bound"))
    step, lin = parts[1][1], parts[2][1]
    print(f"\ndecode step reaches {bound / step:.0%} of the bound; outside the weight products: {(step - lin) * 1e3:.2f} ms "
          f"({(step - lin) / step:.0%} of the step); the forms tried: {', '.join(PRODUCTS)}")


if __name__ == "__main__":
    main()
