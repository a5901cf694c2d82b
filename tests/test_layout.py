"""The per-image token plan (adaptok.layout.TokenLayout): grouping, input
order and its inverse, packing with a prefix per group, the position tables
per grid, and a layout-aware norm inside a patched block."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.layers import resample_abs_pos_embed

import adaptok
from adaptok.bench.baselines import at_grid
from adaptok.layout import TokenLayout, host_grid, mixed_grids
from adaptok.nn import TokenLengthLayerNorm

# Every permutation of these, plus one image, all alike and every one different.
ORDER_CASES = ([[3]], [[2, 2, 2, 2]], [list(p) for p in itertools.permutations([2, 3, 4, 3])],
               [[5, 1, 4, 2, 3]])


def order_cases():
    return [grids for group in ORDER_CASES for grids in group]


@pytest.mark.parametrize("grids", order_cases(), ids=lambda g: "-".join(map(str, g)))
def test_groups_and_order(grids):
    layout = TokenLayout.from_grid(grids, len(grids))
    sides = [g for g, _ in layout.groups]
    assert sides == sorted(set(grids), reverse=True)  # one group per grid, largest first
    for g, members in layout.groups:
        assert list(members) == [i for i, x in enumerate(grids) if x == g]  # input order within a group
    assert sorted(layout.order) == list(range(len(grids)))
    assert [grids[i] for i in layout.order] == [g for g, idx in layout.groups for _ in idx]
    assert all(layout.order[layout.inverse[i]] == i for i in range(len(grids)))
    assert layout.in_input_order == (list(layout.order) == list(range(len(grids))))


@pytest.mark.parametrize("grids", order_cases(), ids=lambda g: "-".join(map(str, g)))
def test_restore_undoes_the_packed_order(grids):
    """Rows in packed order come back in input order: tensors, tuples of
    them, and ragged batches (sequences of different lengths)."""
    layout = TokenLayout.from_grid(grids, len(grids))
    rows = torch.arange(len(grids) * 3, dtype=torch.float32).view(len(grids), 3)
    packed = rows[list(layout.order)]
    assert torch.equal(layout.restore(packed), rows)
    a, b = layout.restore((packed, 2 * packed))
    assert torch.equal(a, rows) and torch.equal(b, 2 * rows)
    seqs = [torch.full((g * g + 1, 2), float(i)) for i, g in enumerate(grids)]
    ragged = adaptok.RaggedBatch.from_list([seqs[i] for i in layout.order])
    restored = layout.restore(ragged).to_list()
    assert all(torch.equal(x, y) for x, y in zip(restored, seqs))


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2, **kwargs).eval()


@pytest.mark.parametrize("grids", [list(p) for p in itertools.permutations([2, 3, 4])] + [[3], [2, 2]],
                         ids=lambda g: "-".join(map(str, g)))
def test_patched_model_returns_input_order(grids):
    """For every order of the grids, each image's logits are those of the
    image run alone at its grid."""
    model = adaptok.patch(tiny())
    x = torch.randn(len(grids), 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = model(x, grid=grids)
    alone = torch.cat([model(x[i:i + 1], grid=g) for i, g in enumerate(grids)])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def test_pack_with_a_prefix_per_group():
    """Sequences with and without a distillation token in one batch: every
    sequence is its group's prefix, then patches + pos, exactly; lengths,
    grid tags and the inverse order follow."""
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout.from_grid([2, 3, 2], 3)  # groups: 3 (image 1), then 2 (images 0, 2)
    C = 8
    patches = [torch.randn(1, 9, C, generator=g), torch.randn(2, 4, C, generator=g)]
    teacher = torch.randn(1, C, generator=g)  # CLS only
    student = torch.randn(2, C, generator=g)  # CLS + distillation token
    pos = [torch.randn(9, C, generator=g), torch.randn(4, C, generator=g)]
    batch = layout.pack(patches, [(teacher, pos[0]), (student, pos[1])])
    assert batch.lengths == (10, 6, 6)
    assert batch.grid.tolist() == [3, 2, 2]
    expected = [torch.cat([teacher, patches[0][0] + pos[0]]), torch.cat([student, patches[1][0] + pos[1]]),
                torch.cat([student, patches[1][1] + pos[1]])]
    for got, want in zip(batch.to_list(), expected):
        assert torch.equal(got, want)
    assert [s.shape[0] for s in layout.restore(batch).to_list()] == [6, 10, 6]  # images 0, 1, 2
    # A group without any prefix token packs too.
    bare = layout.pack(patches, [(None, pos[0]), (student, pos[1])])
    assert bare.lengths == (9, 6, 6)
    assert torch.equal(bare.to_list()[0], patches[0][0] + pos[0])


def test_pack_checks_name_the_argument():
    layout = TokenLayout.from_grid([2, 3], 2)
    p3, p2 = torch.randn(1, 9, 4), torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="one entry per group"):
        layout.pack([p3], [(None, None)])
    with pytest.raises(ValueError, match=r"patches of grid 2x2 must have shape \[1, 4, C\]"):
        layout.pack([p3, p3], [(None, None), (None, None)])
    with pytest.raises(ValueError, match="a position table for every group or for none"):
        layout.pack([p3, p2], [(None, torch.randn(9, 4)), (None, None)])
    with pytest.raises(ValueError, match=r"images must have shape \[B, C, H, W\] with B = 2"):
        layout.group_images(torch.randn(3, 3, 8, 8), (4, 4))
    with pytest.raises(TypeError, match="grid must be an int"):
        TokenLayout.from_grid(2.0, 2)


def test_group_images_resize_each_group():
    layout = TokenLayout.from_grid([2, 4, 2], 3)
    x = torch.randn(3, 3, 64, 64)
    big, small = layout.group_images(x, (16, 16))
    assert torch.equal(big, x[1:2])  # already 4 x 16 pixels a side
    expected = F.interpolate(x[[0, 2]], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(small, expected)


@pytest.mark.parametrize("name", ["plain", "registers", "no-embed-class"])
def test_position_tables_per_grid(name):
    """The tables the patched model packs with are the model's own at its
    grid and timm's resampling (``set_input_size``) at every other."""
    kwargs = {"plain": {}, "registers": dict(reg_tokens=2), "no-embed-class": dict(reg_tokens=1, no_embed_class=True)}
    model = adaptok.patch(tiny(**kwargs[name]))
    n_pos = 0 if model.no_embed_class else model.num_prefix_tokens
    for g in (4, 3, 2, 6):
        with torch.no_grad():
            prefix, pos = model._prefix_and_pos((g, g))
            ref = at_grid(model, g).pos_embed[0] if g != 4 else model.pos_embed[0]
            alt = resample_abs_pos_embed(model.pos_embed, new_size=[g, g], old_size=[4, 4], num_prefix_tokens=n_pos)[0]
        assert torch.equal(pos, ref[n_pos:]) and torch.equal(pos, alt[n_pos:])
        tokens = torch.cat([model.cls_token[0], *([model.reg_token[0]] if model.reg_token is not None else [])])
        assert torch.equal(prefix, tokens + ref[:n_pos] if n_pos else tokens)


def per_grid_norms(model, grids, seed=0):
    """Replace norm1 of block 0, norm2 of block 1 and the final norm by
    TokenLengthLayerNorms with a distinct weight and bias per grid."""
    g = torch.Generator().manual_seed(seed)
    slots = [(model.blocks[0], "norm1"), (model.blocks[1], "norm2"), (model, "norm")]
    for owner, attr in slots:
        norm = TokenLengthLayerNorm.from_layer_norm(getattr(owner, attr), grids)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))
        setattr(owner, attr, norm)
    return slots


@pytest.mark.parametrize("keep_rate", [None, 0.5], ids=["parity", "evit"])
@pytest.mark.parametrize("order", ["patched-then-swapped", "swapped-then-patched"])
def test_layout_aware_norm_in_patched_blocks(keep_rate, order):
    """A TokenLengthLayerNorm as norm1, norm2 and the final norm of a patched
    model normalizes every sequence with its grid's weights: the mixed batch
    equals each image run alone through a copy whose norms are plain
    LayerNorms (F.layer_norm) holding that grid's row."""
    grids = (4, 3, 2)
    base = tiny()
    if order == "swapped-then-patched":
        model = copy.deepcopy(base)
        slots = per_grid_norms(model, grids)
        adaptok.patch(model, keep_rate=keep_rate, prune_layers=(1,))
    else:
        model = adaptok.patch(copy.deepcopy(base), keep_rate=keep_rate, prune_layers=(1,))
        slots = per_grid_norms(model, grids)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    image_grids = [2, 4, 3, 2, 4]
    out = model(x, grid=image_grids)
    expected = []
    for i, g in enumerate(image_grids):
        plain = adaptok.patch(copy.deepcopy(base), keep_rate=keep_rate, prune_layers=(1,))
        row = grids.index(g)
        for (owner, attr), target in zip(slots, [(plain.blocks[0], "norm1"), (plain.blocks[1], "norm2"),
                                                 (plain, "norm")]):
            norm = getattr(*target)
            with torch.no_grad():
                norm.weight.copy_(getattr(owner, attr).weight[row])
                norm.bias.copy_(getattr(owner, attr).bias[row])
        expected.append(plain(x[i:i + 1], grid=g))
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)
    # The model's own grid (grid=None) is tagged too, so the norms apply.
    torch.testing.assert_close(model(x[1:2]), expected[1], rtol=1e-5, atol=1e-5)


def test_layout_aware_norm_refuses_dense_block_calls():
    model = adaptok.patch(tiny())
    per_grid_norms(model, (4, 2))
    with pytest.raises(adaptok.UnsupportedModelError, match="layout-aware norms runs on a RaggedBatch"):
        model.blocks[0](torch.randn(2, 17, model.embed_dim))


def test_host_grid_and_mixed_grids():
    assert host_grid(3, 2) == (3, 3)
    assert host_grid(torch.tensor([2, 4]), 2) == (2, 4)
    grids = mixed_grids(8, 0.5, 7, 14)
    assert grids.count(7) == 4 and grids != sorted(grids)  # spread through the batch
