"""i2v frame size and pixels as the release prepares them (wan/image2video.py, 2.2.11).

The release is not importable here (it calls CUDA at import), so its lines are transcribed
below, term by term; torchvision's `to_tensor` is used when installed, else its float ops.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vidmoe.cli_args import parse_area
from vidmoe.loading import build_random_pipeline
from vidmoe.presets import get_preset
from vidmoe.sampling.conditioning import load_image
from vidmoe.sampling.settings import GenerateSettings, resolve_settings

A14B = get_preset("i2v-A14B")
TINY = get_preset("tiny-i2v")


def release_size(img_w, img_h, max_area, vae_stride=(4, 8, 8), patch_size=(1, 2, 2)):
    """wan/image2video.py `generate`: the frame size from max_area and the image's shape."""
    h, w = img_h, img_w  # img.shape[1:] of the (3, h, w) tensor
    aspect_ratio = h / w
    lat_h = round(
        np.sqrt(max_area * aspect_ratio) // vae_stride[1] // patch_size[1] * patch_size[1]
    )
    lat_w = round(
        np.sqrt(max_area / aspect_ratio) // vae_stride[2] // patch_size[2] * patch_size[2]
    )
    h = lat_h * vae_stride[1]
    w = lat_w * vae_stride[2]
    return w, h


def release_pixels(pil_image, h, w):
    """`TF.to_tensor(img).sub_(0.5).div_(0.5)`, then the bicubic resize of `y`, unclamped."""
    try:
        import torchvision.transforms.functional as TF

        img = TF.to_tensor(pil_image)
    except ImportError:  # torchvision's to_tensor for an RGB PIL image: uint8 HWC -> CHW / 255
        img = torch.from_numpy(np.array(pil_image, np.uint8, copy=True))
        img = img.view(pil_image.size[1], pil_image.size[0], 3).permute((2, 0, 1)).contiguous()
        img = img.to(dtype=torch.get_default_dtype()).div(255)
    img = img.sub_(0.5).div_(0.5)
    return torch.nn.functional.interpolate(img[None].cpu(), size=(h, w), mode="bicubic")


def noisy_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


ODD = [
    (832, 480),
    (480, 832),
    (1024, 768),
    (1280, 720),
    (1920, 1080),
    (333, 777),
    (1001, 997),
    (640, 641),
    (1, 1),
    (517, 123),
    (123, 517),
    (4000, 3000),
    (720, 1280),
]


@pytest.mark.parametrize("area", [1280 * 720, 832 * 480])
@pytest.mark.parametrize("image_size", ODD)
def test_size_follows_the_image_as_in_the_release(image_size, area):
    s = GenerateSettings(prompt="x", image="<upload>", area=area)
    rs = resolve_settings(s, A14B, image_size=image_size)
    assert (rs.width, rs.height) == release_size(*image_size, area)
    assert rs.area == area and rs.to_dict()["area"] == area and rs.to_dict()["width"] == rs.width


def test_the_issues_examples(tmp_path):
    small = noisy_image(tmp_path / "a.png", (832, 480))
    big = noisy_image(tmp_path / "b.png", (1024, 768))
    # the image's header gives the size; the default area is the model's default width x height
    rs = resolve_settings(GenerateSettings(image=small, area=832 * 480), A14B)
    assert (rs.width, rs.height) == (832, 464)
    rs = resolve_settings(GenerateSettings(image=big), A14B)
    assert (rs.width, rs.height, rs.area) == (1104, 816, 1280 * 720)


def test_explicit_size_is_the_users_override(tmp_path):
    path = noisy_image(tmp_path / "a.png", (1024, 768))
    rs = resolve_settings(GenerateSettings(image=path, width=832, height=480), A14B)
    assert (rs.width, rs.height, rs.area) == (832, 480, None)
    with pytest.raises(ValueError, match="size 1104x816 is not supported by i2v-A14B"):
        resolve_settings(GenerateSettings(image=path, width=1104, height=816), A14B)
    x = load_image(path, 80, 48)  # stretched to exactly the size asked for
    assert x.shape == (1, 3, 1, 48, 80)


@pytest.mark.parametrize(
    ("kwargs", "model", "message"),
    [
        (dict(area=832 * 480, width=832), A14B, "give area or width/height, not both"),
        (
            dict(area=500_000),
            A14B,
            r"area 500000 is not supported by i2v-A14B; supported: "
            r"921600 \(1280\*720\), 399360 \(832\*480\)",
        ),
        (dict(area=0), TINY, r"area must be an integer >= 1; got 0"),
        (dict(area=4096.0), TINY, r"area must be an integer; got 4096.0"),
        (dict(area=4096, image=None), get_preset("tiny-t2v"), "area sets an image-to-video"),
        (
            dict(area=4096, image_size=(4000, 10)),
            TINY,
            r"an image of 4000x10 at area 4096 gives a "
            r"1280x0 frame",
        ),
        (dict(area=16 * 1280 * 720, image_size=(1280, 720)), TINY, "over the limit"),
        (dict(image="/no/such/file.png", image_size=None), TINY, "cannot read image"),
    ],
)
def test_area_and_image_are_checked(kwargs, model, message):
    kwargs = {"image": "<upload>", "image_size": (64, 64), **kwargs}
    image_size = kwargs.pop("image_size")
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(prompt="x", **kwargs), model, image_size=image_size)


def test_parse_area():
    assert parse_area("832*480") == parse_area("832x480") == parse_area("399360") == 399360
    with pytest.raises(ValueError, match="--area must be W\\*H"):
        parse_area("832*")


@pytest.mark.parametrize("image_size", [(832, 480), (1024, 768), (333, 777), (97, 203)])
def test_pixels_equal_the_releases_unclamped(tmp_path, image_size):
    path = noisy_image(tmp_path / "n.png", image_size, seed=sum(image_size))
    w, h = release_size(*image_size, 832 * 480)
    ours = load_image(path, w, h)[:, :, 0]  # (1, 3, H, W)
    theirs = release_pixels(Image.open(path).convert("RGB"), h, w)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.max() > 1 and ours.min() < -1  # a noisy image's bicubic overshoot survives


def test_i2v_y_equals_the_releases(tmp_path):
    """The whole `y` of a tiny i2v pipeline against the release's construction of it."""
    pipe = build_random_pipeline("tiny-i2v")
    path = noisy_image(tmp_path / "n.png", (100, 60), seed=3)
    rs = pipe.resolve(GenerateSettings(prompt="x", image=path))
    w, h = release_size(100, 60, 64 * 64)
    assert (rs.width, rs.height) == (w, h) == (80, 48)
    with torch.no_grad():
        y = pipe._conditioning(rs).y
    # the release (wan/image2video.py): msk, then y = vae.encode(cat[img, zeros]) and cat([msk, y])
    F, lat_h, lat_w = rs.num_frames, h // 8, w // 8
    msk = torch.ones(1, F, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    msk = msk.transpose(1, 2)[0]
    img = release_pixels(Image.open(path).convert("RGB"), h, w)
    video = torch.concat([img.transpose(0, 1), torch.zeros(3, F - 1, h, w)], dim=1)
    with torch.no_grad():
        latent = pipe.vae.encode(video[None])[0]
    theirs = torch.concat([msk, latent])
    assert y.shape == (1, *theirs.shape)
    assert torch.equal(y[0], theirs)


def test_the_server_sizes_an_upload_before_saving_it(tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from vidmoe.serve.app import ServeConfig, create_app

    buf = io.BytesIO()
    Image.new("RGB", (100, 60), (200, 30, 30)).save(buf, format="PNG")
    app = create_app(ServeConfig(model="tiny-i2v", outputs=tmp_path / "out", device="cpu"))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post(
            "/v1/plan",
            data={"prompt": "up", "num_steps": "2"},
            files={"image": ("a.png", buf.getvalue(), "image/png")},
        )
        assert r.status_code == 200, r.text
        settings = r.json()["settings"]
        assert (settings["width"], settings["height"], settings["area"]) == (80, 48, 4096)
        r = c.post(
            "/v1/plan",
            data={"prompt": "up", "area": "2048"},
            files={"image": ("a.png", buf.getvalue(), "image/png")},
        )
        assert r.status_code == 200, r.text
        assert (r.json()["settings"]["width"], r.json()["settings"]["height"]) == release_size(
            100, 60, 2048
        )
