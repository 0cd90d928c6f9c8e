"""Export a model for use elsewhere.

    python export_model.py --ckpt out/full_sft_512.safetensors --out_dir out/minimind-hf              (transformers)
    python export_model.py --ckpt ... --out_dir out/minimind-llama --format llama                     (native Llama)
    python export_model.py --ckpt ... --out_dir out/minimind-gguf --format gguf                       (llama.cpp)
    python export_model.py --ckpt out/full_sft_512.safetensors --lora out/lora_sft_512 --out_dir ... (adapter merged)
hf: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True); llama: no remote code at all;
gguf: dir/minimind.gguf for llama.cpp (`llama-cli -m dir/minimind.gguf`).
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import find_tokenizer
from model.errors import run_script
from model.export import export_gguf, export_hf, export_llama
from model.loading import load_model
from model.tokenizer import load_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/full_sft_512.safetensors", help="anything load_model takes")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--format", default="hf", choices=["hf", "llama", "gguf"])
    parser.add_argument("--lora", default=None, help="a LoRA adapter folder to merge into --ckpt first")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--preset", default=None, help="dims for an upstream .pth")
    parser.add_argument("--gguf_dtype", default="f32", choices=["f32", "f16"])
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="upload the exported folder to this Hugging Face repo (needs network and a token)")
    args = parser.parse_args(argv)

    model = load_model(args.ckpt, preset=args.preset)
    if args.lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.lora).merge_and_unload()
    tokenizer = load_tokenizer(find_tokenizer(args.ckpt, args.tokenizer))
    if args.format == "hf":
        out = export_hf(model, tokenizer, args.out_dir)
    elif args.format == "llama":
        out = export_llama(model, tokenizer, args.out_dir)
    else:
        out = export_gguf(model, tokenizer, f"{args.out_dir}/minimind.gguf", args.gguf_dtype)
    print(f"exported {args.ckpt} ({args.format}) -> {out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        folder = out if out.is_dir() else out.parent
        HfApi().upload_folder(repo_id=args.push_to_hub, folder_path=str(folder), repo_type="model")
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")


if __name__ == "__main__":
    run_script(main)
