import pytest
import torch

from nyu_ssc.models import MODELS, Project2Dto3D, make_model


def _loop_projection(feat, position, grid, parity):
    """Direct per-pixel loop: the reference semantics (parity) or the fixed ones."""
    w, h, d = grid
    b, c = feat.shape[:2]
    out = torch.zeros(b, c, d, h, w)
    seen = torch.zeros(b, d, h, w, dtype=torch.bool)
    for bi in range(b):
        for pix in range(position[bi].numel()):
            p = int(position[bi].reshape(-1)[pix])
            if not parity and p <= 0:
                continue
            x, y, z = p // (h * d), (p // d) % h, p % d
            f = feat[bi].reshape(c, -1)[:, pix]
            if parity or seen[bi, z, y, x]:
                out[bi, :, z, y, x] = torch.maximum(out[bi, :, z, y, x], f)
            else:
                out[bi, :, z, y, x] = f
            seen[bi, z, y, x] = True
    return out


@pytest.mark.parametrize("parity", [False, True])
def test_projection_matches_a_loop(parity):
    g = torch.Generator().manual_seed(0)
    grid = (3, 2, 4)
    feat = torch.randn(2, 3, 4, 5, generator=g)                    # negatives included
    pos = torch.randint(0, 24, (2, 4, 5), generator=g)
    pos[0, 0, :3] = 0                                               # invalid pixels
    pos[1, 1, 1] = pos[1, 2, 2] = 7                                 # two pixels on one voxel
    out = Project2Dto3D(grid, parity=parity)(feat, pos)
    assert out.shape == (2, 3, 4, 2, 3)
    torch.testing.assert_close(out, _loop_projection(feat, pos, grid, parity))
    if not parity:
        assert (out < 0).any()                                      # negative features survive the fixed version


def test_projection_gradient_reaches_the_max_pixel():
    feat = torch.tensor([[[[1.0, 3.0, -2.0]]]], requires_grad=True)
    pos = torch.tensor([[[5, 5, 0]]])
    out = Project2Dto3D((2, 2, 2))(feat, pos)
    out.sum().backward()
    torch.testing.assert_close(feat.grad, torch.tensor([[[[0.0, 1.0, 0.0]]]]))


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_shape(name):
    torch.manual_seed(0)
    grid = (8, 4, 12)                                                # (W, H, D) → output (D/4, H/4, W/4)
    m = make_model(name, grid=grid)
    pos = torch.randint(1, 8 * 4 * 12, (1, 6, 10))
    y = m(position=pos, depth=torch.rand(1, 1, 6, 10), rgb=torch.randn(1, 3, 6, 10),
          tsdf=torch.randn(1, 1, 12, 4, 8))
    assert y.shape == (1, 12, 3, 1, 2) and torch.isfinite(y).all()
    y.mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_model_inputs_and_unknown_name():
    assert make_model("ddrnet", grid=(8, 4, 8)).inputs == ("depth",)
    assert make_model("ddrnet_rgbd", grid=(8, 4, 8)).inputs == ("depth", "rgb")
    assert make_model("palnet", grid=(8, 4, 8)).inputs == ("depth", "tsdf")
    with pytest.raises(ValueError, match="unknown model 'x'"):
        make_model("x")
    with pytest.raises(ValueError, match="needs the 'rgb' input"):
        make_model("ddrnet_rgb", grid=(8, 4, 8))(position=torch.zeros(1, 2, 2, dtype=torch.long))


def test_channels_last_3d_switch_keeps_outputs():
    """The CUDA switch's conversion, checked on CPU: same outputs, Conv3d weights in channels_last_3d."""
    from nyu_ssc.models import to_channels_last_3d
    torch.manual_seed(0)
    m = make_model("ddrnet_rgbd", grid=(8, 4, 12))
    kw = dict(position=torch.randint(1, 8 * 4 * 12, (1, 6, 10)), depth=torch.rand(1, 1, 6, 10),
              rgb=torch.randn(1, 3, 6, 10))
    ref = m(**kw)
    to_channels_last_3d(m)
    w = m.stems["depth"].feature3d[0].conv.weight                      # a 3×3×3 kernel
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    torch.testing.assert_close(m(**kw), ref, rtol=1e-4, atol=1e-5)


def test_load_weights_reads_reference_checkpoints(tmp_path):
    """test.py accepts the reference's {'state_dict'} files with DataParallel 'module.' keys; a mismatch is a DataError."""
    from common.config import DataError
    from nyu_ssc.engine import load_weights
    src = make_model("ddrnet", grid=(8, 4, 8))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "cp.pth.tar")
    dst = make_model("ddrnet", grid=(8, 4, 8))
    load_weights(dst, tmp_path / "cp.pth.tar")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(DataError, match=r"cp\.pth\.tar: checkpoint does not match the model"):
        load_weights(make_model("palnet", grid=(8, 4, 8)), tmp_path / "cp.pth.tar")


def test_ddr_aspp_matches_upstream_layers():
    """`DDR.py` `DDR_ASPP3d`: the 1×1×1 and the pooled branch are bias-free linear convs (no ReLU), so they can be
    negative; `DownsampleBlock3d`'s conv has no bias either."""
    from nyu_ssc.models.ddr import DDRASPP3d, DownsampleBlock3d
    torch.manual_seed(0)
    aspp = DDRASPP3d(8, 4, 6)
    assert aspp.conv1.bias is None and aspp.pool_conv.bias is None
    assert DownsampleBlock3d(8, 16).conv.bias is None
    y = aspp(torch.randn(1, 8, 4, 4, 4))
    assert y.shape == (1, 30, 4, 4, 4)
    assert (y[:, :6] < 0).any() and (y[:, 24:] < 0).any()          # linear branches keep their sign
    assert (y[:, 6:24] >= 0).all()                                  # the DDR branches end in a ReLU


def test_aicnet_stem_widths_match_upstream():
    """`AICNet.py` `SSC_RGBD_AICNet`: 2-D bottlenecks BottleneckDDR2d(8, 4, 8), then BottleneckDDR3d(16, 8, 16)."""
    m = make_model("aicnet", grid=(8, 4, 8))
    for stem in m.stems.values():
        assert stem.feature2d[1].conv_in.out_channels == 4 and stem.feature2d[2].conv_in.out_channels == 4
        assert stem.feature3d[1].conv_in.out_channels == 8 and stem.feature3d[3].conv_in.out_channels == 16
    d = make_model("ddrnet", grid=(8, 4, 8)).stems["depth"]
    assert d.feature2d[1].conv_in.out_channels == 4 and d.feature3d[1].conv_in.out_channels == 4
