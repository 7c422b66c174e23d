"""The TRL side of ``everyprompt-bench trl``: one GRPO run with TRL's ``GRPOTrainer``, in its own process.

``python -m bench.trl_side SPEC.json OUT.json`` (bench/trl_bench.py writes the spec and starts it). The run uses
only TRL's documented API: a ``GRPOConfig``, a local HF model folder (``model=`` a path: the same cold-start SFT
weights everyprompt starts from, plus a tokenizer with the very ids of the built-in character tokenizer), a
``datasets.Dataset`` with a ``prompt`` column (and ``answer``, handed to the reward function), a custom reward
function and a ``TrainerCallback``. Nothing is downloaded.

What is the same as the everyprompt side (the spec carries it; both build the task from the same overrides):
- the prompts and their token ids: the run's own prompt stream (``Task.train_stream``), in order, unshuffled;
  every prompt's TRL tokenization is checked against ``Task.prompt_ids`` before training;
- the reward: the run's verifier (``reward.plugin``, engine/rewards/plugins.py) and shaping
  (engine/algo/shaping.py), on the text the reward worker would see (``tokenizer.decode`` of the completion ids);
- G (``num_generations``), completions per optimizer step (``per_device_train_batch_size``, one generation per
  step, one pass: ``num_iterations=1``), max new tokens (``task.max_answer_tokens``), temperature, learning rate
  (constant, AdamW, weight decay 0, grad clip), the clip range of ``learner.grpo`` and the group std (unbiased);
- held-out accuracy: greedy decoding of the task's eval set with engine/modeling/model.py's decode loop, scored
  with the run's verifier through engine/evaluation.py (``correctness``, ``score_eval``), as the run's evals;
- CPU threads: ``torch.set_num_threads(spec["threads"])`` (and OMP_NUM_THREADS set by the parent).

Recorded: per optimizer step its wall time since training began, with time spent in held-out evals taken out,
and the completion tokens it trained; every eval's accuracy at its step. ``spec["budget_s"]`` stops training
(between steps) once that much training time has passed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from itertools import islice
from pathlib import Path

_T_IMPORT = time.monotonic()  # start-up (imports, model and dataset, trainer) is timed from here

def tokenizer_folder(folder: Path) -> None:
    """An HF fast tokenizer in ``folder`` with the ids of engine/data/tokenizer.py's CharTokenizer (one token per
    character) that prepends ``<bos>`` as ``CharTokenizer.prompt_ids`` does; left padding (TRL's requirement)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from engine.data.tokenizer import CharTokenizer

    char = CharTokenizer()
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(char.vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", char.bos_id)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            padding_side="left").save_pretrained(str(folder))


def model_folder(sft_dir: str, folder: Path) -> Path:
    """A complete local HF folder for TRL: the SFT checkpoint's config, weights and generation config, plus
    ``tokenizer_folder``'s tokenizer. Rebuilt on every call (cheap: a few MB)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (Path(sft_dir) / name).exists():
            shutil.copy2(Path(sft_dir) / name, folder / name)
    tokenizer_folder(folder)
    return folder


class Scorer:
    """The run's reward and held-out scoring, as the reward worker computes them (actors/reward_worker.py)."""

    def __init__(self, cfg, task) -> None:
        from actors.reward_worker import verifier_name
        from engine.rewards.plugins import resolve

        self.cfg, self.task = cfg, task
        self.verify = resolve(verifier_name(cfg.reward))
        self.options = {"sandbox": cfg.reward.sandbox}

    def score(self, ids: list[int], answer: str) -> tuple[float, float]:
        """(shaped reward, raw correctness) of one response's token ids."""
        from engine.algo.shaping import reward_parts, shaped_reward
        from engine.evaluation import correctness

        text = self.task.tokenizer.decode(list(ids))
        verdict = self.verify(text, answer, self.options)
        if not verdict.valid:
            return 0.0, correctness(0.0, dict(verdict.parts))
        parts = reward_parts(correct=verdict.score, response=text, reference=answer, tokens=list(ids),
                             max_length=self.task.max_answer_tokens, shaping=self.cfg.reward)
        parts.update(verdict.parts)
        return shaped_reward(parts, self.cfg.reward), correctness(0.0, parts)

    def held_out(self, model) -> float:
        """Greedy accuracy on the task's eval set (engine/evaluation.py's score_eval)."""
        import torch

        from engine.evaluation import score_eval
        from engine.modeling.model import generate

        tok, examples = self.task.tokenizer, self.task.eval_set
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outs = generate(model, [self.task.prompt_ids(ex) for ex in examples],
                            max_new_tokens=self.task.max_answer_tokens, temperature=0.0, eos_id=tok.eos_id,
                            pad_id=tok.pad_id)
        model.train(was_training)
        return score_eval([self.score(o.token_ids, ex.answer)[1] for o, ex in zip(outs, examples)])["accuracy"]


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from configs.load import load
    from engine.data.tasks import load_task

    cfg = load(spec["overrides"])
    task = load_task(cfg)
    scorer = Scorer(cfg, task)
    G, per_step, steps = cfg.rollout.group_size, spec["completions_per_step"], spec["steps"]
    folder = model_folder(spec["sft_dir"], Path(spec["work_dir"]) / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    examples = [ex for _, ex, _ in islice(task.train_stream(cfg.seed, cfg.task.train_pool), steps * per_step // G)]
    for ex, ids in zip(examples, tokenizer([ex.prompt for ex in examples])["input_ids"]):  # the same token ids
        if list(ids) != task.prompt_ids(ex):
            raise RuntimeError(f"TRL tokenizes {ex.prompt!r} as {ids}, everyprompt as {task.prompt_ids(ex)}")
    dataset = Dataset.from_dict({"prompt": [ex.prompt for ex in examples], "answer": [ex.answer for ex in examples]})
    tokens: list[int] = []  # completion tokens of each generation (one per optimizer step)

    def reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
        tokens.append(sum(len(ids) for ids in completion_ids))
        return [scorer.score(ids, ref)[0] for ids, ref in zip(completion_ids, answer)]

    clock = {"eval_s": 0.0, "t0": 0.0}
    rows: list[dict] = []
    evals: list[dict] = []

    def train_s() -> float:
        return time.monotonic() - clock["t0"] - clock["eval_s"]

    def evaluate(model, step: int) -> None:
        t, at = time.monotonic(), train_s()
        evals.append({"step": step, "train_s": at, "accuracy": scorer.held_out(model)})
        clock["eval_s"] += time.monotonic() - t

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            clock["t0"] = time.monotonic()
            evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            rows.append({"step": state.global_step, "train_s": train_s(), "tokens": tokens[-1] if tokens else 0})
            if spec["eval_every"] and state.global_step % spec["eval_every"] == 0:
                evaluate(model, state.global_step)
            if spec["budget_s"] and train_s() >= spec["budget_s"]:
                control.should_training_stop = True

    grpo = cfg.learner.grpo
    args = GRPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "out"), report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=10 ** 9, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=cfg.seed, data_seed=cfg.seed, shuffle_dataset=False, dataloader_num_workers=0,
        max_steps=steps, per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        num_generations=G, num_iterations=1, max_completion_length=task.max_answer_tokens,
        temperature=cfg.rollout.temperature, top_p=1.0, top_k=0,
        learning_rate=cfg.learner.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip,
        beta=0.0, epsilon=grpo.clip_eps_low, epsilon_high=grpo.clip_eps_high, loss_type="dapo",
        scale_rewards="group", router_aux_loss_coef=0.0, model_init_kwargs={"dtype": "float32"})
    trainer = GRPOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Record()])
    trainer.train()
    total = rows[-1]["train_s"] if rows else 0.0
    if not evals or evals[-1]["step"] != (rows[-1]["step"] if rows else 0):
        evaluate(trainer.model, rows[-1]["step"] if rows else 0)
    return {"steps": rows, "evals": evals, "train_s": total, "tokens": sum(r["tokens"] for r in rows),
            "startup_s": clock["t0"] - _T_IMPORT if clock["t0"] else None, "threads": torch.get_num_threads(),
            "trl_version": __import__("trl").__version__}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
