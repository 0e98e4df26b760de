"""A rollout packed into bins of a fixed token budget, built on the host (NumPy).

    packed = pack_groups(config, groups, budget, shards=data_parallel_shards)
    hidden = model.packed_hidden_states(packed.inputs, packed.tree)        # (K, N, D)
    logp = ...(predicting_hidden(hidden, packed.layout.predicted_by), packed.layout.targets)   # (K, S)
    per_row = unpack(logp, packed.layout, rows, width)                     # (rows, width)

A padded batch lays each sample out as its own row, the prompt left-padded to the longest
prompt and the response right-padded to the longest response: at the paper's lengths most
of it is padding. Here a bin of `budget` tokens holds whole *sequences* one after another,
and nothing else but its unused tail. A sequence is a group's prompt followed by its G
responses, each response attending to the prompt and to itself only (the token tree of
vppo_jax/models/qwen2_5_vl/packed.py), so the prompt runs once. Groups go into the bins
longest first (ties in rollout order: deterministic), each whole into the first bin with
room; where no bin has room for it, it is split: the first bin with room for its prompt and
its next response takes a copy of the prompt (and its images) and as many of its next
responses as fit, and so on, a new bin when no bin has room. Bins fill nearly full (a
group of G long responses is a large item), at the price of a prompt copy per split. The
bin count is padded to a multiple of the data-parallel shards with empty bins (no valid token).

Every token keeps its M-RoPE positions of the unpadded row prompt + response (`rope_index`,
as transformers numbers them), so the decoder's hidden states are those of each row alone.

Predictions are indexed by the token predicted, and only response tokens are predicted: a
bin's S response slots (S the most response tokens any bin holds) list its response tokens
in order, each with its target (the token), the position whose hidden state predicts it
(`predicted_by`: its response's previous token, or, for the first, its prompt's last: the
prompt's last position predicts the first token of each of its G responses), and its place
in the (rows, response window) layout of the padded update (`row`, p * G + g for sample g of
group p, and `column`, its index in its response). The vocabulary projection then runs at
the response tokens only, as in the padded update, and per-row reductions (loss, TAS, TGF,
metrics) run as they do on padded rows.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vppo_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vppo_jax.models.qwen2_5_vl.inputs import (
    ModelInputs,
    count_windows,
    image_inputs,
    largest_frame_windows,
    rope_index,
)
from vppo_jax.models.qwen2_5_vl.packed import TokenTree, token_tree


@dataclasses.dataclass(frozen=True)
class Group:
    """A prompt and its samples, unpadded: token ids with every <|image_pad|> expanded."""

    prompt: np.ndarray  # (P,) int
    responses: tuple[np.ndarray, ...]  # G arrays of response token ids, each (L_g,)
    pixel_values: np.ndarray | None = None  # the prompt's images' patch rows, as the HF processor gives them
    image_grid_thw: np.ndarray | None = None  # (images, 3)


@dataclasses.dataclass(frozen=True)
class Sequence:
    """A group's prompt and some of its responses, one after another in a bin."""

    group: int
    responses: tuple[int, ...]  # indexes into the group's responses, ascending
    length: int  # tokens: the prompt's and those responses'


@flax.struct.dataclass
class RowBins:
    """A bin's twin: the same rows and response slots (in the same order), each row a sequence of
    its own after its own copy of its prompt and images. VPPO perturbs each row's images on its
    own (as the reference does), so its perturbed forward cannot share a prompt between rows."""

    inputs: ModelInputs  # (K, N') the twin bins
    tree: TokenTree
    predicted_by: jax.Array  # (K, S): the twin's position whose hidden state predicts each slot's token


@flax.struct.dataclass
class PackedLayout:
    """Where each token of K bins of N = budget tokens belongs (see the module docstring)."""

    tree: TokenTree
    # (K, S) per response slot of each bin:
    targets: jax.Array  # int32: the response token
    predicted_by: jax.Array  # int32: the position whose hidden state predicts it
    response_mask: jax.Array  # bool: the slot holds a response token (the bin may hold fewer than S)
    row: jax.Array  # int32: the token's row, -1 in an empty slot
    column: jax.Array  # int32: its index within its response, -1 in an empty slot
    rows_alone: RowBins | None = None


@flax.struct.dataclass
class PackedBatch:
    inputs: ModelInputs  # the bins as rows (K, N): ids, valid tokens, M-RoPE positions, images
    layout: PackedLayout


def pack_sequences(groups: list[Group], budget: int) -> tuple[list[Sequence], list[list[int]]]:
    """The groups' sequences and the bins they fill (indexes into the sequences), as the module
    docstring says; a group whose responses are all empty (a filler group) is in no bin."""
    for index, group in enumerate(groups):
        longest = max(map(len, group.responses), default=0)
        if len(group.prompt) + longest > budget:
            raise ValueError(
                f"group {index}: its prompt ({len(group.prompt)} tokens) and its longest response "
                f"({longest} tokens) do not fit in a bin of {budget} tokens: raise the token budget to at "
                f"least {len(group.prompt) + longest}."
            )
    length = lambda i: len(groups[i].prompt) + sum(map(len, groups[i].responses))
    all_sequences, bins, free = [], [], []
    for index in sorted(range(len(groups)), key=lambda i: (-length(i), i)):
        group = groups[index]
        prompt, sizes = len(group.prompt), [len(r) for r in group.responses]
        pending = list(range(len(sizes))) if any(sizes) else []
        while pending:
            whole = prompt + sum(sizes[g] for g in pending)
            b = next((b for b, room in enumerate(free) if room >= whole), None)
            if b is None:
                b = next((b for b, room in enumerate(free) if room >= prompt + sizes[pending[0]]), len(bins))
            if b == len(bins):
                bins.append([])
                free.append(budget)
            take, used = [], prompt
            while pending and used + sizes[pending[0]] <= free[b]:
                used += sizes[pending[0]]
                take.append(pending.pop(0))
            all_sequences.append(Sequence(index, tuple(take), used))
            bins[b].append(len(all_sequences) - 1)
            free[b] -= used
    return all_sequences, bins


def _sequence_positions(config: Qwen2_5_VLConfig, group: Group, responses: list[np.ndarray]) -> list[np.ndarray]:
    """M-RoPE positions (3, length) of the prompt, then of each response: those of the unpadded
    rows prompt + response, numbered by `rope_index` (one row per response, right-padded)."""
    prompt = np.asarray(group.prompt)
    width = max(map(len, responses))
    rows = np.zeros((len(responses), len(prompt) + width), np.int64)
    mask = np.zeros(rows.shape, bool)
    for r, response in enumerate(responses):
        rows[r, : len(prompt) + len(response)] = np.concatenate([prompt, response])
        mask[r, : len(prompt) + len(response)] = True
    grids = None if group.image_grid_thw is None else np.tile(group.image_grid_thw, (len(responses), 1))
    types = (rows == config.image_token_id).astype(np.int64)
    positions, _ = rope_index(rows, types, mask, grids, config.vision.spatial_merge_size)
    return [positions[:, 0, : len(prompt)]] + [
        positions[:, r, len(prompt) : len(prompt) + len(response)] for r, response in enumerate(responses)
    ]


def pack_groups(
    config: Qwen2_5_VLConfig, groups: list[Group], budget: int, shards: int = 1, min_bins: int = 1
) -> PackedBatch:
    """The groups' sequences in bins of `budget` tokens, at least `min_bins` of them (one compiled
    shape for several batches) and a multiple of `shards`. Rows are numbered group by group.
    The attention tree is built for `config.attention_block`."""
    all_sequences, bins = pack_sequences(groups, budget)
    count = -(-max(len(bins), min_bins) // shards) * shards
    bins += [[] for _ in range(count - len(bins))]
    fill = _fill_bins(config, groups, all_sequences, bins, budget)
    return _packed_batch(config, fill, fill.row, _most_responses([fill]))


def pack_micro_batches(
    config: Qwen2_5_VLConfig,
    groups: list[Group],
    budget: int,
    shards: int = 1,
    min_micro_batches: int = 1,
    min_rows: int = 1,
    min_slots: int = 1,
    rows_alone: bool = False,
    min_row_tokens: int = 1,
) -> tuple[PackedBatch, np.ndarray]:
    """The groups' sequences in micro-batches of `shards` bins of `budget` tokens (one bin per
    device), at least `min_micro_batches` of them: a PackedBatch with a leading micro-batch
    axis M, and `rows` (M, b): the rows of each micro-batch, ascending, -1 where it has fewer
    than b (b at least `min_rows` and a multiple of `shards`). The layout's `row` indexes a
    micro-batch's own rows (0 .. b - 1), so per-row arrays of a micro-batch are (b, ...).
    Bins have at least `min_slots` response slots.

    `rows_alone`: the layout also holds each bin's twin, its rows each with its own copy of
    its prompt (`RowBins`, at least `min_row_tokens` tokens a bin), for VPPO's perturbed forward."""
    all_sequences, bins = pack_sequences(groups, budget)
    micro_batches = max(-(-len(bins) // shards), min_micro_batches)
    bins += [[] for _ in range(micro_batches * shards - len(bins))]
    per_micro_batch = lambda a: [a[m * shards : (m + 1) * shards] for m in range(micro_batches)]
    fills = [_fill_bins(config, groups, all_sequences, part, budget) for part in per_micro_batch(bins)]
    width = max(min_rows, max(len(f.rows) for f in fills))
    width = -(-width // shards) * shards
    rows = np.full((micro_batches, width), -1, np.int64)
    for m, f in enumerate(fills):
        rows[m, : len(f.rows)] = f.rows
    slots = max(min_slots, _most_responses(fills))
    packed = _stacked(config, fills, slots)
    if rows_alone:
        alone = [
            Sequence(s.group, (g,), len(groups[s.group].prompt) + len(groups[s.group].responses[g]))
            for s in all_sequences
            for g in s.responses
        ]
        first = np.cumsum([0] + [len(s.responses) for s in all_sequences])  # each sequence's first in `alone`
        twin_bins = [[i for item in items for i in range(first[item], first[item + 1])] for items in bins]
        length = max(min_row_tokens, *(sum(alone[i].length for i in items) for items in twin_bins))
        twins = _stacked(
            config, [_fill_bins(config, groups, alone, part, length) for part in per_micro_batch(twin_bins)], slots
        )
        twin = RowBins(inputs=twins.inputs, tree=twins.layout.tree, predicted_by=twins.layout.predicted_by)
        packed = packed.replace(layout=packed.layout.replace(rows_alone=twin))
    return packed, rows


def _stacked(config: Qwen2_5_VLConfig, fills: list["_Fill"], slots: int) -> PackedBatch:
    """Micro-batches' fills as one PackedBatch (M, K, ...), rows numbered within each, with
    one image layout for all (a fill without an image gets slots of padding)."""
    grids = [np.concatenate(f.grids) for f in fills if f.grids]
    if grids:
        dtype = next(f.pixel_values[0].dtype for f in fills if f.pixel_values)
        for f in fills:
            if not f.grids:
                f.pixel_values, f.grids = [np.zeros((0, config.vision.patch_dim), dtype)], [np.zeros((0, 3), int)]
    windows = max((count_windows(config.vision, g) for g in grids), default=1)
    frame_windows = max((largest_frame_windows(config.vision, g) for g in grids), default=1)
    packed = [_packed_batch(config, f, np.searchsorted(f.rows, f.row), slots, windows, frame_windows) for f in fills]
    return jax.tree.map(lambda *leaves: np.stack(leaves), *packed)


@dataclasses.dataclass
class _Fill:
    """Bins' token arrays (K, N), their M-RoPE positions (3, K, N), images, and rows (ascending)."""

    ids: np.ndarray
    segment: np.ndarray
    branch: np.ndarray
    predicted_by: np.ndarray
    row: np.ndarray
    column: np.ndarray
    positions: np.ndarray
    pixel_values: list
    grids: list
    rows: np.ndarray


def _fill_bins(
    config: Qwen2_5_VLConfig, groups: list[Group], all_sequences: list[Sequence], bins: list[list[int]], budget: int
) -> _Fill:
    """The bins' tokens, each bin its sequences one after another (rows numbered group by group)."""
    first_row = np.cumsum([0] + [len(g.responses) for g in groups])
    members = [all_sequences[item] for items in bins for item in items]
    shape = (len(bins), budget)
    fill = _Fill(
        **{name: np.full(shape, value, np.int64) for name, value in _EMPTY_TOKEN.items()},
        positions=np.zeros((3, *shape), np.int64),
        pixel_values=[],
        grids=[],
        rows=np.array(sorted(first_row[s.group] + g for s in members for g in s.responses), np.int64),
    )
    for b, members in enumerate(bins):
        start = 0
        for segment, item in enumerate(members):
            sequence = all_sequences[item]
            group = groups[sequence.group]
            responses = [np.asarray(group.responses[g]) for g in sequence.responses]
            parts = [(np.asarray(group.prompt), 0)] + [(r, g + 1) for r, g in zip(responses, sequence.responses)]
            prompt_end = start + len(group.prompt) - 1
            for (tokens, branch), part_positions in zip(parts, _sequence_positions(config, group, responses)):
                span = slice(start, start + len(tokens))
                fill.ids[b, span] = tokens
                fill.segment[b, span] = segment
                fill.branch[b, span] = branch
                fill.positions[:, b, span] = part_positions
                if branch and len(tokens):
                    # The first response token is predicted by the prompt's last position.
                    fill.predicted_by[b, span] = np.arange(start - 1, start + len(tokens) - 1)
                    fill.predicted_by[b, start] = prompt_end
                    fill.row[b, span] = first_row[sequence.group] + branch - 1
                    fill.column[b, span] = np.arange(len(tokens))
                start += len(tokens)
            if group.pixel_values is not None:
                fill.pixel_values.append(group.pixel_values)
                fill.grids.append(group.image_grid_thw)
    return fill


_EMPTY_TOKEN = {"ids": 0, "segment": -1, "branch": 0, "predicted_by": 0, "row": -1, "column": -1}


def _most_responses(fills: list[_Fill]) -> int:
    """The most response tokens a bin of the fills holds."""
    return max(1, *(int((f.row >= 0).sum(1).max()) for f in fills))


def _packed_batch(
    config: Qwen2_5_VLConfig,
    fill: _Fill,
    row: np.ndarray,
    slots: int,
    min_windows: int = 1,
    min_frame_windows: int = 1,
) -> PackedBatch:
    """The model's inputs and the layout of filled bins, `slots` response slots per bin, each
    response token's row taken from `row` (K, N)."""
    response = fill.row >= 0
    position = np.zeros((len(fill.ids), slots), np.int64)  # of each slot's token in its bin
    for b, tokens in enumerate(response):
        where = np.flatnonzero(tokens)
        position[b, : len(where)] = where
    occupied = np.arange(slots)[None] < response.sum(1)[:, None]
    at_slots = lambda a, empty: np.where(occupied, np.take_along_axis(a, position, axis=1), empty).astype(np.int32)
    valid = fill.segment >= 0
    vision, image_token_slot = image_inputs(
        config,
        fill.ids,
        np.concatenate(fill.pixel_values) if fill.pixel_values else None,
        np.concatenate(fill.grids) if fill.grids else None,
        min_windows,
        min_frame_windows,
    )
    inputs = ModelInputs(
        input_ids=fill.ids.astype(np.int32),
        attention_mask=valid,
        position_ids=fill.positions.astype(np.int32),
        image_token_slot=image_token_slot,
        vision=vision,
    )
    layout = PackedLayout(
        tree=token_tree(valid, fill.segment, fill.branch, config.attention_block),
        targets=at_slots(fill.ids, 0),
        predicted_by=at_slots(fill.predicted_by, 0),
        response_mask=occupied,
        row=at_slots(row, -1),
        column=at_slots(fill.column, -1),
    )
    return PackedBatch(inputs=inputs, layout=layout)


def predicting_hidden(hidden: jax.Array, predicted_by: jax.Array) -> jax.Array:
    """(K, N, D) hidden states of K bins -> at each response slot, the one that predicts its token (K, S, D)."""
    return jnp.take_along_axis(hidden, predicted_by[..., None], axis=1)


def unpack(values: jax.Array, layout: PackedLayout, rows: int, width: int, fill=0) -> jax.Array:
    """Per-slot values (K, S) of the response tokens in the padded layout (rows, width):
    `fill` where a row has no token."""
    row = jnp.where(layout.response_mask, layout.row, rows)  # out of range: dropped
    return jnp.full((rows, width), fill, values.dtype).at[row, layout.column].set(values, mode="drop")
