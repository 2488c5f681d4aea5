"""ti2v frame size and pixels as the release prepares them (wan/textimage2video.py `i2v` and
wan/utils/utils.py `best_output_size`, 2.2.11).

The release's package is not importable here (it calls CUDA at import), so its lines are
transcribed below, term by term; where the wan22 package is installed, the transcription of
`best_output_size` is also held to the release's own function, loaded from its file.
"""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidmoe.loading import build_random_pipeline
from vidmoe.presets import get_preset
from vidmoe.sampling.conditioning import load_image_cropped
from vidmoe.sampling.settings import GenerateSettings, resolve_settings

FIVE_B = get_preset("ti2v-5B")
TINY = get_preset("tiny-ti2v")


def best_output_size(w, h, dw, dh, expected_area):
    """wan/utils/utils.py `best_output_size`, transcribed."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    assert ow1 % dw == 0 and oh1 % dh == 0 and ow1 * oh1 <= expected_area
    ratio1 = ow1 / oh1
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    assert oh2 % dh == 0 and ow2 % dw == 0 and ow2 * oh2 <= expected_area
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    else:
        return ow2, oh2


def release_size(iw, ih, max_area, vae_stride=(4, 16, 16), patch_size=(1, 2, 2)):
    """wan/textimage2video.py `i2v`: dh, dw from the patch and the VAE stride."""
    dh, dw = patch_size[1] * vae_stride[1], patch_size[2] * vae_stride[2]
    return best_output_size(iw, ih, dw, dh, max_area)


def release_pixels(img, ow, oh):
    """wan/textimage2video.py `i2v`: Lanczos resize to cover, centre crop, to_tensor, [-1, 1]."""
    iw, ih = img.width, img.height
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1 = (img.width - ow) // 2
    y1 = (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    assert img.width == ow and img.height == oh
    try:
        import torchvision.transforms.functional as TF

        t = TF.to_tensor(img)
    except ImportError:  # torchvision's to_tensor of an RGB PIL image: uint8 HWC -> CHW / 255
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        t = t.to(dtype=torch.get_default_dtype()).div(255)
    return t.sub_(0.5).div_(0.5).unsqueeze(1)  # (3, 1, oh, ow)


def noisy_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


ODD = [
    (1280, 704),
    (704, 1280),
    (832, 480),
    (1024, 768),
    (1920, 1080),
    (333, 777),
    (1001, 997),
    (640, 641),
    (517, 123),
    (123, 517),
    (4000, 3000),
    (720, 1280),
    (1, 1),
]


@pytest.mark.parametrize("image_size", ODD)
def test_size_follows_the_image_as_in_the_release(image_size):
    area = 1280 * 704
    rs = resolve_settings(GenerateSettings(image="<upload>"), FIVE_B, image_size=image_size)
    assert (rs.width, rs.height) == release_size(*image_size, area)
    assert rs.area == area and rs.to_dict()["area"] == area
    assert rs.width * rs.height <= area and rs.width % 32 == 0 and rs.height % 32 == 0


def test_the_transcription_is_the_releases_function():
    spec = importlib.util.find_spec("wan")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the wan22 package (the release) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "utils.py"
    # the function alone: the module imports imageio and friends, which need not be here
    tree = ast.parse(path.read_text())
    (node,) = [n for n in tree.body if getattr(n, "name", None) == "best_output_size"]
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    theirs_fn = namespace["best_output_size"]
    checked = 0
    for w, h in ODD[:-1] + [(97, 203), (3000, 17)]:
        for area in (1280 * 704, 4096, 832 * 480):
            try:
                theirs = theirs_fn(w, h, 32, 32, area)
            except ZeroDivisionError:
                continue
            assert best_output_size(w, h, 32, 32, area) == theirs
            checked += 1
    assert checked > 30


def test_examples_and_the_default_size():
    # the default area is the model's default width x height, the release's --size 1280*704
    rs = resolve_settings(GenerateSettings(image="<upload>"), FIVE_B, image_size=(1024, 768))
    assert (rs.width, rs.height, rs.area) == (1088, 800, 1280 * 704)
    rs = resolve_settings(GenerateSettings(image="<upload>"), FIVE_B, image_size=(1920, 1080))
    assert (rs.width, rs.height) == (1248, 704)
    # without an image, ti2v-5B is text-to-video at its default size, with no area
    rs = resolve_settings(GenerateSettings(), FIVE_B)
    assert (rs.width, rs.height, rs.area) == (1280, 704, None)


def test_explicit_size_is_the_users_override(tmp_path):
    path = noisy_image(tmp_path / "a.png", (1024, 768))
    rs = resolve_settings(GenerateSettings(image=path, width=704, height=1280), FIVE_B)
    assert (rs.width, rs.height, rs.area) == (704, 1280, None)
    x = load_image_cropped(path, 96, 32)  # covered and cropped, not stretched
    assert x.shape == (1, 3, 1, 32, 96)
    theirs = release_pixels(Image.open(path).convert("RGB"), 96, 32)
    assert torch.equal(x[0], theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(area=4096, image=None), "area sets the size from the image, and tiny-ti2v"),
        (dict(area=4096, width=64), "give area or width/height, not both"),
        (dict(image_size=(4000, 10)), r"an image of 4000x10 at area 4096 gives a \d+x0 frame"),
        (dict(image_size=(10, 4000)), r"an image of 10x4000 at area 4096 gives a 0x\d+ frame"),
    ],
)
def test_area_and_image_are_checked(kwargs, message):
    kwargs = {"image": "<upload>", "image_size": (64, 64), **kwargs}
    image_size = kwargs.pop("image_size")
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(prompt="x", **kwargs), TINY, image_size=image_size)
    with pytest.raises(ValueError, match="area 4096 is not supported by ti2v-5B"):
        resolve_settings(GenerateSettings(image="<upload>", area=4096), FIVE_B, image_size=(9, 9))


@pytest.mark.parametrize("image_size", [(1280, 704), (1024, 768), (333, 777), (97, 203)])
def test_pixels_equal_the_releases(tmp_path, image_size):
    path = noisy_image(tmp_path / "n.png", image_size, seed=sum(image_size))
    w, h = release_size(*image_size, 1280 * 704)
    ours = load_image_cropped(path, w, h)[0]  # (3, 1, H, W)
    theirs = release_pixels(Image.open(path).convert("RGB"), w, h)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.max() <= 1 and ours.min() >= -1  # resized in uint8: nothing to clamp


def test_ti2v_first_latent_equals_the_releases(tmp_path):
    """The clean first latent of a tiny ti2v pipeline: the release's `z = vae.encode([img])`
    of its preprocessed image, at the size its rule picks."""
    pipe = build_random_pipeline("tiny-ti2v")
    path = noisy_image(tmp_path / "n.png", (150, 60), seed=3)
    rs = pipe.resolve(GenerateSettings(prompt="x", image=path))
    w, h = release_size(150, 60, 64 * 64)
    assert (rs.width, rs.height, rs.area) == (w, h, 4096) == (96, 32, 4096)
    with torch.no_grad():
        ours = pipe._conditioning(rs).first_latent
        img = release_pixels(Image.open(path).convert("RGB"), w, h)
        theirs = pipe.vae.encode(img[None])
    assert ours.shape == theirs.shape == (1, 48, 1, h // 16, w // 16)
    assert torch.equal(ours, theirs)
    result = pipe.generate("x", image=path, num_steps=2, num_frames=5, output="latents")
    assert result.latents.shape[-2:] == (h // 16, w // 16)
    assert torch.equal(result.latents[:, :, :1], theirs)  # the known frame stays the image's
    assert result.settings.to_dict()["area"] == 4096
