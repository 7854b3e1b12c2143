"""A tiny Vicuna programmed to answer with fixed ids (tests of generation, inference.py and app.py, and the app
load test dev/chaos/app_load.py).

A random tiny LLM emits random ids, so a test cannot wait for it to produce a signal block. Instead the tiny
Vicuna is turned into a lookup table: with every attention o_proj and MLP down_proj zeroed, the last hidden state
is RMSNorm(embedding of the current token), so the greedy next token is the lm_head row that points along the
current token's embedding. Rows are set (orthonormal embeddings) so that generation walks
    <prompt ends with t0> -> WORD -> [IMG0..3] -> [VID0..23] -> [AUD0..7] -> </s>        ("signal" delta)
    <prompt ends with t0> -> WORD -> </s>                                                 ("text" delta)
The base rows (t0, WORD, </s>) live in the LLM folder, the 38 new rows in the delta, exactly as after training.
Everything after that is the real code: prompt template, generate, signal-block scan, output projectors,
diffusers pipelines, writers.
"""

from __future__ import annotations

SCALE = 10.0


def build(tiny_env, root):
    """-> {overrides, deltas: {signal, text}, word, signal_text}; files under `root`."""
    import torch
    from transformers import LlamaForCausalLM

    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.data.conversation import prompt_for_generation
    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable
    from nextgpt.tokens import load_tokenizer

    tokenizer, token_ids = load_tokenizer(tiny_env.ckpt / "vicuna")
    prompt_ends = {prompt_for_generation(text, [], tokenizer, token_ids).input_ids[-1]
                   for text in ("Show me everything", "Tell me a joke.")}
    assert len(prompt_ends) == 1, "the generation prompt should end with the same token whatever the question"
    (t0,) = prompt_ends
    word = tokenizer.encode("Sure", add_special_tokens=False)[-1]
    eos = token_ids.eos
    new_ids = token_ids.new_token_ids                                  # <Img>, </Img>, [IMG0..3], [VID..], [AUD..]
    signal = [i for m in ("image", "video", "audio") for i in token_ids.signal[m]]

    llm = LlamaForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    hidden = llm.config.hidden_size
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    vector = {t0: basis[0], word: basis[1], **{token: basis[2 + k] for k, token in enumerate(new_ids)}}
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight[t0] = vector[t0]
        llm.model.embed_tokens.weight[word] = vector[word]
        llm.lm_head.weight[word] = SCALE * vector[t0]
        # </s> follows WORD (text delta) and the last signal token; [IMG0] beats it after WORD with 2x SCALE
        llm.lm_head.weight[eos] = SCALE * (vector[word] + vector[signal[-1]])
    llm_dir = root / "vicuna"
    llm.save_pretrained(str(llm_dir))
    tokenizer.save_pretrained(str(llm_dir))

    overrides = [f"model.llm={llm_dir}", "inference.do_sample=false"]
    cfg = tiny_env.config("stage_3", *overrides, "train.trainable=[lora,input_proj,output_proj]")
    deltas = {}
    for kind in ("signal", "text"):
        torch.manual_seed(0)
        model = build_model(cfg)
        embed_rows = torch.stack([vector[i] for i in new_ids])                        # (38, D)
        head_rows = torch.zeros(len(new_ids), hidden)
        if kind == "signal":
            chain = [word] + signal
            for previous, token in zip(chain, chain[1:]):
                head_rows[new_ids.index(token)] = SCALE * vector[previous] * (2 if previous == word else 1)
        llm_utils.set_token_matrix(model.llm, "embed_tokens", embed_rows, model.token_ids)
        llm_utils.set_token_matrix(model.llm, "lm_head", head_rows, model.token_ids)
        set_trainable(model, cfg)
        deltas[kind] = checkpoint.save_delta(model, root / f"delta_{kind}", cfg, {"stage": 3, "step": 0})
    word_text = tokenizer.decode([word]).strip()
    signal_text = "".join(tokenizer.convert_ids_to_tokens(signal))
    return {"overrides": overrides, "deltas": deltas, "word": word_text, "signal_text": signal_text}


