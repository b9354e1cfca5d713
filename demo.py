"""The whole pipeline on the built-in corpus, on a laptop CPU: what `make demo` runs.

    python demo.py                    # synth -> vocab -> shards -> train -> export -> C engine stories -> evaluation
    python demo.py --train_seconds=60 # a shorter training run (stories get worse)
    python demo.py --instruct_share=0 # a plain model: no stories on request

By default nine training stories in ten carry an instruction (pretokenize --instruct=true), so
the model also writes a story on request: the demo asks `./run -m instruct` for one with three
words training never asked for together (instruct.held_out) and dialogue. The plain tenth trains
what `./run -i 从前，` asks for, a story from nothing but its beginning.

Each step is the same command a user would type (printed before it runs), and each one skips work
that is already done, so running the demo again reuses the corpus, the tokenizer, the shards and
the trained checkpoint, and only prints new stories.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from options import UserError, apply_options, cli, opt, render_help

ROOT = Path(__file__).resolve().parent


@dataclass
class DemoConfig:
    n_stories: int = opt(60000, "built-in stories to generate")
    vocab_size: int = opt(3000, "sentencepiece vocabulary: the built-in corpus's ~1,100 characters are all pieces, "
                                "none spelled in bytes (docs/data.md)")
    preset: str = opt("tiny", "model.PRESETS name; tiny is about 1M parameters")
    max_iters: int = opt(1500, "optimizer steps; the step count, not the clock, decides when it is done")
    train_seconds: int = opt(450, "safety stop for slow machines (a checkpoint is saved either way)")
    out_dir: str = opt("out/demo", "checkpoint, exports, loss curve and evaluation")
    temperature: float = opt(0.7, "sampling temperature of the C engine's stories")
    top_p: float = opt(0.9, "nucleus sampling threshold")
    steps: int = opt(256, "tokens per story")
    seed: int = opt(42, "sampling seed of the first story (the others follow)")
    data_root: str = opt("data", "corpus, tokenizer and shards (the tests point this at a temporary folder)")
    run_bin: str = opt("run", "where the C engine is built")
    eval_samples: int = opt(2, "completions per prompt in the closing evaluation (0: skip it)")
    instruct_share: float = opt(0.9, "share of the training stories given an instruction (pretokenize "
                                     "--instruct=true); 0 = a plain model, no story on request")
    words: str = opt("公园,面包,鸽子", "the story on request: words it must use (a triple held out of training)")
    features: str = opt("对话", "... and features it must have")


PROMPTS = ["从前，", "有一天，小猫", "小明和他的狗"]


def step(title: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print(f"\n==> {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, **kwargs)
    if result.returncode != 0:
        raise UserError(f"step '{title}' failed (exit {result.returncode}); see the output above")
    print(f"    ({time.time() - t0:.0f} s)", flush=True)
    return result


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(render_help(DemoConfig, "python demo.py [--key=value ...]", __doc__))
        return 0
    return cli("demo.py", lambda: run_demo(apply_options(DemoConfig(), argv)))


def checkpoint_state(path: Path):
    """(the step the checkpoint at path reached, what it was trained on: its data.instruct record's
    lang and share or None for a plain model, and its shards' tokenizer hash), read in one load;
    (-1, None) when there is no checkpoint."""
    import checkpoint  # imports torch: only once the data steps are done
    if not os.path.lexists(path):
        return -1, None
    ckpt = checkpoint.load(path)
    rec = (ckpt.get("data") or {}).get("instruct")
    data = ((rec.get("lang"), rec.get("share")) if isinstance(rec, dict) else None), checkpoint.tokenizer_hash(ckpt)
    return int(ckpt["iter_num"]), data


def run_demo(cfg: DemoConfig) -> int:
    if not 0.0 <= cfg.instruct_share <= 1.0:
        raise UserError(f"--instruct_share={cfg.instruct_share} must be in [0, 1]")
    asked = cfg.instruct_share > 0
    if asked:
        import instruct
        instruct.make_instruction(words=cfg.words, features=cfg.features)  # a bad request fails before the work
    py = sys.executable
    t_start = time.time()
    V = cfg.vocab_size
    out = Path(cfg.out_dir)
    data = Path(cfg.data_root)
    tok_model, tok_bin = data / f"tok{V}.model", data / f"tok{V}.bin"
    # Only a non-default location shows up in the printed commands, which users copy.
    where = [] if cfg.data_root == "data" else [f"--data_root={data}"]

    step("1/8 generate the built-in story corpus",
         [py, "tinystories.py", "synth", f"--n_stories={cfg.n_stories}", *where])
    step("2/8 train a sentencepiece vocabulary",
         [py, "tinystories.py", "train_vocab", "--dataset=synth", f"--vocab_size={V}", *where])
    if not (ROOT / tok_bin).exists():
        step("    export the tokenizer for the C engine",
             [py, "tokenizer.py", f"--tokenizer-model={tok_model}"])
    ins_flags = ["--instruct=true", f"--instruct_share={cfg.instruct_share}"] if asked else []
    step("3/8 pretokenize into uint16 shards" + (f" ({cfg.instruct_share:.0%} of the stories with an instruction)"
                                                  if asked else ""),
         [py, "tinystories.py", "pretokenize", "--dataset=synth", f"--vocab_size={V}", *ins_flags, *where])

    from tokenizer import Tokenizer

    done, trained_on = checkpoint_state(ROOT / out / "ckpt.pt")
    # A checkpoint from other data (with or without instructions, or an older vocabulary: a newer
    # corpus or tokenizer rule retrains it) is not resumed but trained again.
    want = (("zh", cfg.instruct_share) if asked else None), Tokenizer(str(ROOT / tok_model)).hash()
    if done >= 0 and trained_on != want:
        print(f"\n    {out / 'ckpt.pt'} was trained on other data (with or without instructions, or "
              "another vocabulary); training a new one", flush=True)
        done = -1
    data_flag = "--vocab_source=custom" if not where else f"--data_dir={data / f'tok{V}'}"
    train_cmd = [py, "train.py", f"--preset={cfg.preset}", data_flag, f"--vocab_size={V}",
                 f"--out_dir={out}", f"--max_iters={cfg.max_iters}", f"--lr_decay_iters={cfg.max_iters}",
                 f"--max_seconds={cfg.train_seconds}", "--log_interval=50"]
    if done >= cfg.max_iters:
        print(f"\n==> 4/8 train: {out / 'ckpt.pt'} already reached step {done}; skipping", flush=True)
    else:
        if done >= 0:
            train_cmd.append("--init_from=resume")
        step("4/8 train the model on the CPU", train_cmd)
    step("    draw the loss curve", [py, "train.py", "plot", str(out)])

    model_bin, model_q8, model_bf16 = out / "model.bin", out / "model_q8.bin", out / "model_bf16.bin"
    step("5/8 export for the C engine (fp32, int8 and bf16)",
         [py, "export.py", str(model_bin), f"--checkpoint={out}/ckpt.pt", f"--tokenizer={tok_model}"])
    step("    int8", [py, "export.py", str(model_q8), "--version=3", "--dtype=int8",
                      f"--checkpoint={out}/ckpt.pt", f"--tokenizer={tok_model}"])
    step("    bf16", [py, "export.py", str(model_bf16), "--version=3", "--dtype=bf16",
                      f"--checkpoint={out}/ckpt.pt", f"--tokenizer={tok_model}"])
    run_bin = "./run" if cfg.run_bin == "run" else cfg.run_bin
    step("6/8 build the C engine", ["make", "-s", "runomp", *([] if cfg.run_bin == "run" else [f"BIN={run_bin}"])])

    print("\n==> 7/8 stories from the C engine", flush=True)
    for i, prompt in enumerate(PROMPTS):
        cmd = [run_bin, str(model_bin), "-z", str(tok_bin), "-t", str(cfg.temperature), "-p", str(cfg.top_p),
               "-s", str(cfg.seed + i), "-n", str(cfg.steps), "-i", prompt]
        print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0:
            raise UserError(f"./run failed (exit {r.returncode})")

    if asked:
        cmd = [run_bin, str(model_bin), "-z", str(tok_bin), "-m", "instruct", "-w", cfg.words,
               *(["-f", cfg.features] if cfg.features else []), "-t", str(cfg.temperature), "-p", str(cfg.top_p),
               "-s", str(cfg.seed), "-n", str(cfg.steps)]
        print(f"\n    a story on request: words never asked for together in training\n"
              f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0:
            raise UserError(f"./run -m instruct failed (exit {r.returncode})")

    if cfg.eval_samples > 0:
        step("8/8 how good are the stories? fp32, int8 and bf16 beside real held-out stories"
             + ("; stories on request" if asked else ""),
             [py, "evaluate.py", f"--bin={model_bin}", f"--bin={model_q8}", f"--bin={model_bf16}", f"--tokenizer={tok_bin}",
              *([] if not where else [f"--data_dir={data / f'tok{V}'}"]), f"--samples={cfg.eval_samples}",
              "--val_stories=100", f"--run_bin={run_bin}", f"--out={out}/eval",
              *(["--instruct=true", "--instruct_requests=4"] if asked else [])])

    ask_hint = (f"  ./run {model_bin} -z {tok_bin} -m instruct -w 小猫,皮球 -f 对话,寓意   # a story on request\n"
                if asked else "")
    print(f"""
Done in {time.time() - t_start:.0f} s. What is where:
  {data}/synth/            the built-in corpus (jsonl)
  {tok_model}, .bin   the tokenizer (sentencepiece, and the C engine's file)
  {data}/tok{V}/          pretokenized shards
  {out}/ckpt.pt        the checkpoint; {out}/log.jsonl the training log
  {out}/loss.png       the loss curves
  {model_bin}, {model_q8}, {model_bf16}   the fp32, int8 and bf16 models for ./run
  {out}/eval/report.md  the evaluation: story metrics beside real stories, plots, samples
Next:
  ./run {model_q8} -z {tok_bin} -i '从前，'            # the int8 model, faster
{ask_hint}  python sample.py --checkpoint={out}/ckpt.pt --prompt='从前，'
  python evaluate.py --checkpoint={out}/ckpt.pt --bin={model_q8} --tokenizer={tok_model}  # PyTorch vs int8
  python tinystories.py download && python tinystories.py train_vocab --vocab_size=5000 \\
      && python tinystories.py pretokenize --vocab_size=5000           # the real TinyStoriesChinese
  python train.py --preset=stories15M                                   # one GPU
  torchrun --standalone --nproc_per_node=4 train.py --preset=stories110M  # a GPU server
""")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
