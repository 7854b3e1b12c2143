"""The delta state of a model: every tensor a checkpoint holds, under one name per tensor, and its strict loading.

    input_proj.<key>                the encoder-side projector
    output_proj.<modality>.<key>    one decoder-side projector per modality
    token_rows.embed_tokens / .lm_head   the 38 new rows (38, D), or whole (V, D) matrices (token_rows=all, or
                                    after a whole matrix was loaded)
    lora.<PEFT key>                 LoRA weights, when LoRA is on

nextgpt.checkpoint.delta writes / reads it as a delta folder, nextgpt.checkpoint.legacy as the original's pytorch_model.pt.
"""

from __future__ import annotations

import torch

from nextgpt.model import llm as llm_utils


def group_of(key: str) -> str:
    """input_proj | output_proj.<modality> | token_rows | lora"""
    head = key.split(".")
    return f"output_proj.{head[1]}" if head[0] == "output_proj" else head[0]


def expected_keys(model) -> dict[str, tuple[int, ...]]:
    """Every delta-state key the model has a place for -> its shape (token rows: the full matrix shape)."""
    keys = {f"input_proj.{k}": tuple(v.shape) for k, v in model.input_proj.state_dict().items()}
    for modality, projector in model.output_proj.items():
        keys |= {f"output_proj.{modality}.{k}": tuple(v.shape) for k, v in projector.state_dict().items()}
    for name in llm_utils.TOKEN_MATRICES:
        keys[f"token_rows.{name}"] = tuple(llm_utils.base_token_weight(model.llm, name).shape)
    if llm_utils.has_lora(model.llm):
        keys |= {f"lora.{k}": tuple(v.shape) for k, v in llm_utils.lora_state_dict(model.llm).items()}
    return keys


def delta_state(model, groups: set[str] | None = None, full_token_matrices: bool | None = None) -> dict:
    """{delta-state key: CPU tensor} for `groups` (default: model.delta_groups; token rows always)."""
    groups = set(model.delta_groups if groups is None else groups) | {"token_rows"}
    full = model.full_token_matrices if full_token_matrices is None else full_token_matrices
    state: dict[str, torch.Tensor] = {}
    if "input_proj" in groups:
        state |= {f"input_proj.{k}": v for k, v in model.input_proj.state_dict().items()}
    for modality, projector in model.output_proj.items():
        if f"output_proj.{modality}" in groups:
            state |= {f"output_proj.{modality}.{k}": v for k, v in projector.state_dict().items()}
    new_ids = torch.tensor(model.token_ids.new_token_ids)
    for name in llm_utils.TOKEN_MATRICES:
        matrix = llm_utils.effective_token_matrix(model.llm, name)
        state[f"token_rows.{name}"] = matrix if full else matrix[new_ids.to(matrix.device)]
    if "lora" in groups and llm_utils.has_lora(model.llm):
        state |= {f"lora.{k}": v for k, v in llm_utils.lora_state_dict(model.llm).items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _allowed(group: str, allow_missing) -> bool:
    return group in allow_missing or group.split(".")[0] in allow_missing


def apply_delta_state(model, state: dict[str, torch.Tensor], where: str, allow_missing=()) -> set[str]:
    """Strictly load a delta state into the model -> the groups loaded.

    Unexpected keys, wrong shapes, and missing keys of groups not named in allow_missing are errors that list them
    (a group named in allow_missing may be absent as a whole, never in part).
    """
    expected = expected_keys(model)
    new_rows = len(model.token_ids.new_token_ids)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} unexpected key(s) (the model has no place for them): "
                         f"{', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    bad_shapes = []
    for key, value in state.items():
        shape = expected[key]
        if key.startswith("token_rows."):
            ok = tuple(value.shape) in (shape, (new_rows, shape[1]))
        else:
            ok = tuple(value.shape) == shape
        if not ok:
            bad_shapes.append(f"{key} {tuple(value.shape)} (model: {shape})")
    if bad_shapes:
        raise ValueError(f"{where}: shape mismatch: {'; '.join(bad_shapes[:20])}")
    missing = sorted(set(expected) - set(state))
    present_groups = {group_of(k) for k in state}
    not_allowed = [k for k in missing if group_of(k) in present_groups or not _allowed(group_of(k), allow_missing)]
    if not_allowed:
        raise ValueError(f"{where}: {len(not_allowed)} missing key(s): {', '.join(not_allowed[:20])}"
                         f"{' ...' if len(not_allowed) > 20 else ''}")

    with torch.no_grad():
        input_state = {k[len("input_proj."):]: v for k, v in state.items() if k.startswith("input_proj.")}
        if input_state:
            model.input_proj.load_state_dict(input_state, strict=True)
        for modality, projector in model.output_proj.items():
            prefix = f"output_proj.{modality}."
            projector_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if projector_state:
                projector.load_state_dict(projector_state, strict=True)
        for name in llm_utils.TOKEN_MATRICES:
            value = state.get(f"token_rows.{name}")
            if value is not None:
                llm_utils.set_token_matrix(model.llm, name, value, model.token_ids)
                if value.shape[0] != new_rows:
                    model.full_token_matrices = True
        lora_state = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        if lora_state:
            llm_utils.load_lora_state_dict(model.llm, lora_state)
    model.delta_groups |= present_groups
    return present_groups
