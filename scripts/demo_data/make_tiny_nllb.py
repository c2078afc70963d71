"""Writes crb/demo_data/tiny-nllb/: the config and tokenizer (no weights) of a tiny NLLB-architecture
model (M2M100) for the CPU translation demo. The tokenizer is NLLB's, with the guide's 25 language
tokens and a small vocabulary trained on the shipped translations. Re-run after changing them:

    python scripts/demo_data/make_tiny_nllb.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import M2M100Config, NllbTokenizer

from crb.recipe.schema import LANGUAGES

HERE = Path(__file__).resolve().parents[2] / "crb" / "demo_data"  # where the shipped data files live


def main() -> None:
    records = [json.loads(line) for line in (HERE / "retail_translations.jsonl").read_text().splitlines()]
    texts = [r[k] for r in records for k in ("source_text", "target_text")]
    base = NllbTokenizer(extra_special_tokens=list(LANGUAGES), src_lang="eng_Latn", tgt_lang="hin_Deva")
    tok = base.train_new_from_iterator(texts, vocab_size=1200)
    config = M2M100Config(vocab_size=len(tok), d_model=128, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                          decoder_ffn_dim=256, max_position_embeddings=256, dropout=0.0, scale_embedding=True,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.eos_token_id)
    out = HERE / "tiny-nllb"
    config.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: vocabulary {len(tok)}")


if __name__ == "__main__":
    main()
