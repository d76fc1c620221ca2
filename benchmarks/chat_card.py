"""kogpt-mini-chat's model card numbers, in one run: the validation answer perplexity of kogpt-mini with and
without the chat adapter, and its replies to questions that are not in the training file.

The validation split is the one `kogpt sft` carves from --train without --val (SPLIT_SEED, 5%); base and
adapter are scored on its answer tokens (the chat template's encode mask, EOS included) in fp32. Replies are
generated from the chat template's prompt, cut at its stop strings, with the bundled generation_config's
sampling (seed + the question's index; also by the base alone, for contrast) and greedily; a question found
anywhere in the training file is refused.

    python benchmarks/chat_card.py --json /tmp/card.json    # the bundled kogpt-mini-chat; --adapter DIR for another
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from kogpt.api import KoGPT
from kogpt.data.chats import read_conversations
from kogpt.evaluation.tasks.base import split_examples
from kogpt.hf.hub import BUNDLED, resolve
from kogpt.hf.load import load
from kogpt.text.chat import ChatTemplate
from kogpt.text.tokenizer import Tokenizer
from kogpt.training.sft import SPLIT_SEED, encode_conversations

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["요즘 잠이 잘 안 와요. 어떻게 하면 좋을까요?", "주말에 비가 온다는데 뭐 하고 놀까?", "친구가 내 생일을 잊어버렸어.",
             "내일 면접인데 너무 떨려.", "고양이를 키우고 싶은데 괜찮을까?", "오늘 점심 메뉴 추천해 줘.",
             "혼자 여행 가 본 적 있어?", "운동을 꾸준히 하는 방법이 뭘까?", "회사 동료랑 사이가 안 좋아.", "시험을 망쳐서 속상해."]


@torch.inference_mode()
def answer_loss(model, examples, batch: int = 32) -> float:
    """Mean NLL (nats) of the examples' answer tokens, each masked id given the ids before it; examples of alike
    length right-padded into batches (causal: padding after a token does not change its logits)."""
    total, n = 0.0, 0
    examples = sorted(examples, key=lambda e: len(e.ids))
    for i in range(0, len(examples), batch):
        rows = examples[i:i + batch]
        T = len(rows[-1].ids)
        x = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in rows])  # (B, T)
        keep = torch.tensor([e.mask[1:] + [False] * (T - len(e.ids)) for e in rows])  # (B, T-1)
        logp = model(x[:, :-1]).float().log_softmax(-1)  # (B, T-1, V)
        total -= logp.gather(-1, x[:, 1:, None])[..., 0][keep].sum().item()
        n += int(keep.sum())
    return total / n


def replies(gpt: KoGPT, template: ChatTemplate, seed: int, greedy: bool) -> list[str]:
    """The reply to each question alone, sampled with seed + its index (or greedy), cut at the stops."""
    out = []
    for i, q in enumerate(QUESTIONS):
        prompt, stops = template.render([{"role": "user", "content": q}])
        out.append(gpt.generate(prompt, stop=stops, seed=seed + i, greedy=greedy).strip())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="kogpt-mini-chat", help="the chat adapter (folder or bundled name)")
    p.add_argument("--train", default=str(ROOT.parent / "shared/data/corpus/chatbot/ChatbotData.csv"),
                   help="the file it was trained on (its validation split is carved from it)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="kogpt sft's --val-fraction")
    p.add_argument("--seed", type=int, default=1, help="sampling seed of the replies")
    p.add_argument("--json", help="write the numbers and replies here")
    args = p.parse_args(argv)

    base_dir, template = BUNDLED / "kogpt-mini", ChatTemplate.default()
    tok = Tokenizer.from_dir(base_dir)
    conversations, _ = read_conversations(args.train)
    text = Path(args.train).read_text(encoding="utf-8")
    seen = [q for q in QUESTIONS if q.rstrip(".?!") in text]  # anywhere in the file, even without its punctuation
    if seen:
        sys.exit(f"questions found in {args.train}: {seen}")
    examples, _ = encode_conversations(conversations, template, tok, 512, skip_bad=False)
    _, val = split_examples(examples, args.val_fraction, SPLIT_SEED)  # the split sft() carves (same set)
    result = {"val_conversations": len(val), "val_answer_tokens": sum(sum(e.mask[1:]) for e in val)}
    for name, adapter in (("base", None), ("adapter", args.adapter)):
        loss = answer_loss(load(base_dir, "fp32", adapter=adapter and resolve(adapter)), val)
        result[name] = {"val_answer_loss": loss, "val_answer_ppl": math.exp(loss)}
        print(f"{name:8s} val answer loss {loss:.4f}  ppl {math.exp(loss):.2f}", flush=True)

    base, gpt = KoGPT.from_pretrained("kogpt-mini"), KoGPT.from_pretrained("kogpt-mini", adapter=args.adapter)
    d = gpt.defaults
    result["decoding"] = {"sampling": dataclasses.asdict(d.sampling), "max_length": d.max_length,
                          "max_new_tokens": d.max_new_tokens, "seed": args.seed,
                          "dtype": str(gpt.model.wte.weight.dtype)}
    result["samples"] = {"questions": QUESTIONS, "base_sampled": replies(base, template, args.seed, greedy=False),
                         "sampled": replies(gpt, template, args.seed, greedy=False),
                         "greedy": replies(gpt, template, args.seed, greedy=True)}
    for i, q in enumerate(QUESTIONS):
        kinds = ("base_sampled", "sampled", "greedy")
        print(f"Q: {q}", *(f"  {k}: {result['samples'][k][i]}" for k in kinds), sep="\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
