"""NextGPT.generate after overfitting one answer on the tiny checkpoints (minutes of Adam steps on a CPU, so not a
unit test): the conditioning comes from the signal tokens as inputs, the positions training regresses."""

from __future__ import annotations

import torch

from batches import make_batch, sample
from nextgpt.data.conversation import signal_blocks
from nextgpt.data.types import Target, Turn
from nextgpt.model.nextgpt import build_model


def test_generate_signal_blocks(tiny_env):
    """Overfit one answer, then generate it: conditioning from the signal tokens as inputs (the training
    positions), a block ending exactly at max_new_tokens still decodes, a cut block is reported."""
    torch.manual_seed(0)
    cfg = tiny_env.config(3, "train.loss_weights={lm: 1.0}")
    model = build_model(cfg)
    model.requires_grad_(True)
    question = "show me a red circle"
    train = sample([Turn("human", question), Turn("gpt", "here", "image")], targets=[Target("image", "i.npy")])
    batch = make_batch(model, [train])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):
        out = model(batch)
        if out["token_acc"] == 1.0 and out["lm"] < 0.05:
            break
        optimizer.zero_grad()
        out["lm"].backward()
        optimizer.step()
    assert out["token_acc"] == 1.0, "the tiny model did not memorise the answer"
    answer_ids = [t for t in batch["labels"][0].tolist() if t != -100]      # here [IMG0..3] ###
    generation = model.generate(question, max_new_tokens=20, do_sample=False)
    assert generation.token_ids == answer_ids
    assert generation.text == "here[IMG0][IMG1][IMG2][IMG3]"
    assert [m for m, _ in generation.outputs] == ["image"] and not generation.truncated
    conditioning = generation.outputs[0][1]
    assert conditioning.shape == (1, *model.conditioning_shapes["image"])
    with torch.no_grad():         # the same tensor training regresses at these positions
        embeds, token_embeds = model.embed(batch["input_ids"])
        hidden = model.causal_lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        start = signal_blocks(batch["labels"][0].tolist(), model.token_ids)[0][1]
        expected = model.project("image", hidden, token_embeds, [(0, start)])
    torch.testing.assert_close(conditioning, expected)
    n_text = len(answer_ids) - 5                        # tokens before [IMG0]
    exact = model.generate(question, max_new_tokens=n_text + 4, do_sample=False)      # ends with [IMG3]
    assert [m for m, _ in exact.outputs] == ["image"] and not exact.truncated
    torch.testing.assert_close(exact.outputs[0][1], expected)
    model.cfg.inference.force_signal = False                # plain decoding: the block is cut and reported
    cut = model.generate(question, max_new_tokens=n_text + 2, do_sample=False)
    assert cut.outputs == [] and cut.truncated == ["image"]
    model.cfg.inference.force_signal = True                 # the default: a block that cannot finish never starts
    forced = model.generate(question, max_new_tokens=n_text + 2, do_sample=False)
    assert forced.outputs == [] and not forced.truncated and model.token_ids.signal["image"][0] not in forced.token_ids
    assert model.training                               # generate restores the mode it found
