"""The DALI loader's behaviour: the set sampler's order, epochs, resume, workers, evaluation loaders,
dtypes, ``--loader auto`` and the GPU graph (``test_dali_optional.py``: without DALI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from mmcam_fast.data.dali import DaliLoader, dali_available
from mmcam_fast.data.dali_spec import transform_spec
from mmcam_fast.data.datasets import WSOLDataset
from mmcam_fast.data.loaders import build_loader, resolve_backend
from mmcam_fast.data.splits import build_datasets, set_batch_sampler
from mmcam_fast.data.transforms import train_transform
from mmcam_fast.errors import ConfigError, MMCamError

SYNTHETIC = {"num_classes": 4, "train_per_class": 20, "val_per_class": 2, "test_per_class": 2, "size": 32}
pytestmark = [pytest.mark.dali,
              pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_datasets("synthetic", tmp_path_factory.mktemp("dali") / "set", image_size=32,
                          synthetic=SYNTHETIC)


def _sampler(data, seed=5):
    return set_batch_sampler(data.train, sets_per_batch=2, set_size=4, seed=seed)


def _reference(data, epoch: int, seed=5) -> list[list[int]]:
    sampler = _sampler(data, seed)
    sampler.set_epoch(epoch)
    return [list(batch) for batch in sampler]


# -- with DALI ----------------------------------------------------------------------------------------

def test_set_batches_arrive_in_the_sampler_order_across_epochs_breaks_and_resume(data):
    loader = DaliLoader(data.train, batch_sampler=_sampler(data), workers=1, parallel=False, seed=5)
    assert len(loader) == 10 and loader.batch_size == 8
    labels = np.asarray(data.train.labels)

    def indices(epoch, stop=None):
        loader.set_epoch(epoch)
        got = []
        for images, batch_labels, batch_indices in loader:
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
            assert batch_labels.tolist() == labels[batch_indices.numpy()].tolist()
            got.append(batch_indices.tolist())
            if stop is not None and len(got) == stop:
                break
        return got

    assert indices(0) == _reference(data, 0)  # a whole epoch
    assert indices(1, stop=3) == _reference(data, 1)[:3]  # cut short: the prefetched rest is dropped
    assert indices(2) == _reference(data, 2)
    assert indices(2) == _reference(data, 2)  # the same epoch again
    assert indices(7) == _reference(data, 7)  # a jump
    # resume in the middle of an epoch from the loader's state
    loader.set_epoch(4)
    iterator = iter(loader)
    head = [next(iterator)[2].tolist() for _ in range(4)]
    state = loader.state_dict()
    assert state["position"] == 4 and state["sampler"]["position"] == 4
    resumed = DaliLoader(data.train, batch_sampler=_sampler(data), workers=1, parallel=False, seed=5)
    resumed.load_state_dict(state)
    tail = [b[2].tolist() for b in resumed]
    assert head + tail == _reference(data, 4)
    assert [b[2].tolist() for b in resumed] == _reference(data, 4)  # the next pass starts at 0
    ring = loader._ring_file
    assert ring is not None and ring.exists()
    loader.close()
    resumed.close()
    assert not ring.exists()  # closing (or collecting the loader, or exiting) removes the plan ring


def test_parallel_workers_give_the_same_batches_and_augmentations(data):
    """Files read by two spawned workers through the shared plan ring: the same batches and pixels as
    the loader's own process, since crops and flips come from (seed, rank, epoch, position)."""
    inline = DaliLoader(data.train, batch_sampler=_sampler(data), workers=1, parallel=False, seed=5)
    workers = DaliLoader(data.train, batch_sampler=_sampler(data), workers=2, parallel=True, seed=5)
    for epoch in (0, 1):
        inline.set_epoch(epoch)
        workers.set_epoch(epoch)
        pairs = list(zip(inline, workers, strict=True))
        assert [b[2].tolist() for _, b in pairs] == _reference(data, epoch)
        for a, b in pairs:
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    inline.close()
    workers.close()


def test_eval_loader_steps_padding_shards_and_sizes(data):
    loader = DaliLoader(data.test, batch_size=3, workers=1, return_sizes=True)
    batches = list(loader)
    assert len(loader) == 3 and [len(b[2]) for b in batches] == [3, 3, 2]  # the padded last batch is cut
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(8))
    sizes = torch.cat([b[3] for b in batches])
    assert sizes.tolist() == [list(data.test.original_size(i)) for i in range(8)] == [[32, 32]] * 8
    assert DaliLoader(data.test, batch_size=3, drop_last=True).steps_per_epoch == 2
    shards = []
    for rank in (0, 1):
        dali, steps = build_loader(data.test, batch_size=3, backend="dali", rank=rank, world_size=2)
        torch_loader, torch_steps = build_loader(data.test, batch_size=3, rank=rank, world_size=2)
        got = torch.cat([b[2] for b in dali]).tolist()
        assert got == torch.cat([b[2] for b in torch_loader]).tolist() and steps == torch_steps == 2
        shards.append(got)
        dali.close()
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ConfigError, match="does not shuffle"):
        DaliLoader(data.test, batch_size=3, shuffle=True, rank=0, world_size=2)
    loader.close()


@pytest.mark.parametrize(("dtype", "channels_last", "atol"), [
    # atol: one unit in the last place of the dtype at the largest normalised value (|x| <= 2.64):
    # fp16 2^-9 ~ 2e-3, bf16 2^-6 ~ 1.6e-2 (rounded up to 2e-2), fp32 float arithmetic only
    (torch.float16, True, 2e-3),  # made by DALI
    (torch.bfloat16, True, 2e-2),  # float32 from DALI, cast in torch (DALI has no bfloat16)
    (torch.float32, False, 1e-6),  # CHW from DALI: contiguous NCHW
])
def test_dtypes_and_memory_layouts_are_still_nchw_tensors(data, dtype, channels_last, atol):
    reference = next(iter(DaliLoader(data.test, batch_size=4)))[0]
    images = next(iter(DaliLoader(data.test, batch_size=4, dtype=dtype, channels_last=channels_last)))[0]
    torch_images = next(iter(build_loader(data.test, batch_size=4, dtype=dtype,
                                          channels_last=channels_last)[0]))[0]
    for batch in (images, torch_images):
        assert batch.shape == (4, 3, 32, 32) and batch.dtype == dtype
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        assert batch.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(images.float(), reference, atol=atol, rtol=0)
    # + the resize's interior bound, one 8-bit level (docs/data.md, "DALI"): 1 / 255 / std 0.224 = 0.0175
    torch.testing.assert_close(torch_images.float(), reference, atol=atol + 0.02, rtol=0)


def test_auto_picks_dali_for_image_files_with_the_protocol_transforms(data):
    assert resolve_backend("auto", data.train) == "dali"
    assert resolve_backend("torch", data.train) == "torch"
    assert resolve_backend("auto", [(torch.zeros(3, 8, 8), 0, 0)]) == "torch"  # not files on disk
    jitter = WSOLDataset(data.train.image_root, data.train.metadata,
                         v2.Compose([v2.Resize((32, 32)), v2.ColorJitter(0.4), v2.ToImage()]))
    assert resolve_backend("auto", jitter) == "torch"
    with pytest.raises(ConfigError, match="ColorJitter"):
        build_loader(jitter, batch_size=2, backend="dali")
    loader, steps = build_loader(data.test, batch_size=4, backend="auto")
    assert isinstance(loader, DaliLoader) and steps == 2
    loader.close()


def test_a_loader_out_of_step_with_its_plan_fails_loudly(data):
    """The check that makes a wrong ring margin an error instead of mislabelled images: with no
    margin DALI reads ring slots the plan has not written yet."""
    loader = DaliLoader(data.train, batch_sampler=_sampler(data), workers=1, parallel=False, seed=5)
    loader._ahead = 0
    with pytest.raises(MMCamError, match="DALI loader out of step at epoch 0"):
        list(loader)


def test_the_gpu_graph_puts_decoding_and_every_image_op_on_the_gpu(data, tmp_path):
    """The "mixed" pipeline cannot run here; its graph can be built (device_id None, never run)."""
    from mmcam_fast.data.dali_pipeline import wsol_pipeline
    from mmcam_fast.data.dali_source import PathTable, PlanSource

    ring = tmp_path / "ring.bin"
    np.zeros((4, 2, 5), np.int64).tofile(ring)
    source = PlanSource(PathTable(tmp_path, ["a.jpg"]), [0], ring, 4, 2, "error", augment=True)
    spec = transform_spec(train_transform(32, vertical_flip=True))
    pipe = wsol_pipeline(source=source, spec=spec, decode_device="mixed", channels_last=True,
                         batch_size=2, num_threads=1, device_id=None)
    assert len(pipe.serialize()) > 0  # builds the graph
    devices = {}
    for op in pipe._ops:  # DALI's graph after serialize(): operator specs with input/output devices
        name = op.name.strip("_").rsplit("_", 1)[0]  # "__Image_6" -> "Image"
        devices.setdefault(name, set()).update(op.spec.OutputDevice(i) for i in range(op.spec.NumOutput()))
    assert devices["Image"] == {"gpu"}  # decoders.image, device "mixed"
    for name in ("Resize", "Slice", "Flip", "CropMirrorNormalize"):
        assert devices[name] == {"gpu"}, name
    assert devices["ExternalSource"] == devices["PeekImageShape"] == {"cpu"}
