"""TFDS as the dataset layer, without TensorFlow.

TFDS's catalog builders (tiny_shakespeare, pg19), `tfds.load` and `as_dataset()` need
TensorFlow; a GeneratorBasedBuilder written as array_record and read back through
`as_data_source()` does not (shared/DESIGN.md). So one builder of our own, `deeprnn_text`, holds
each corpus as a config (`time_machine`, `gutenberg_1234`, ...) with one example: the cleaned
document text and where it came from.

TFDS's download manager is not used: deeprnn.data.sources downloads with an injectable fetcher
(tests run without network) and verifies d2l's sha1 pin, then hands the document to `prepare`.
TFDS writes into an `incomplete.*` folder and renames it when done (and deletes it on failure),
so a prepared dataset is either complete or absent.

Imported lazily by deeprnn.data.sources, only when a corpus is not in the mirror: the GPU machines
have no tensorflow-datasets, and reading the mirror must not need it. The 10^8-byte benchmarks
(text8, enwik8) never come here: their verified zip is their cache (sources.py says why).
"""

from __future__ import annotations

import contextlib
import logging
import sys

import tensorflow_datasets as tfds

from deeprnn.errors import UsageError

FIELDS = ("name", "text", "author", "title", "sha256")


class DeeprnnText(tfds.core.GeneratorBasedBuilder):
    """One deeprnn corpus document per config, written as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Document text (Gutenberg boilerplate stripped, no BOM) + source."}
    # TFDS asks for this before a builder may take data from outside its download manager.
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Built by deeprnn.data.sources.load_documents; not by hand."

    def __init__(self, *, example: dict[str, str] | None = None, **kwargs):
        self._example = example  # what _generate_examples writes; None when only reading
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs() looks for metadata files next to the
        # module, which a builder inside a package of other code does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description="A deeprnn corpus document (see deeprnn/data/sources.py for its source).",
            features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in FIELDS}),
        )

    def _split_generators(self, dl_manager):
        if self._example is None:
            raise UsageError(f"deeprnn_text/{self.builder_config.name} is not prepared;"
                             " load it through deeprnn.data.sources.load_documents")
        return {"train": self._generate_examples(self._example)}

    def _generate_examples(self, example):
        yield 0, {f: example[f] for f in FIELDS}


@contextlib.contextmanager
def _quiet():
    """TFDS prints progress to stdout (which carries the corpora CLI's JSON) and warns about
    configs it has no catalog entry for; send the one to stderr and mute the other."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        absl_logger.setLevel(level)


def _builder(config_name: str, root: str, example: dict[str, str] | None = None) -> DeeprnnText:
    return DeeprnnText(data_dir=root, config=tfds.core.BuilderConfig(name=config_name),
                       file_format="array_record", example=example)


def _read(builder: DeeprnnText) -> dict[str, str]:
    record = builder.as_data_source()["train"][0]
    return {f: record[f].decode("utf-8") for f in FIELDS}


def read_prepared(config_name: str, root: str) -> dict[str, str] | None:
    """The stored example of a prepared corpus, or None when it has not been prepared."""
    with _quiet():
        builder = _builder(config_name, root)
        return _read(builder) if builder.is_prepared() else None


def prepare(config_name: str, root: str, example: dict[str, str]) -> dict[str, str]:
    """Writes `example` as deeprnn_text/<config_name> under `root` and reads it back."""
    with _quiet():
        builder = _builder(config_name, root, example)
        builder.download_and_prepare(file_format="array_record")
        return _read(_builder(config_name, root))
