"""What a corpus spec loads to: `python -m deeprnn.corpora --corpus=SPEC [--data_dir=DIR]`.

    python -m deeprnn.corpora --corpus=time_machine --data_dir=../shared/corpora --preprocess=d2l
prints one JSON object: characters 173428 (170580 with d2l_lines), vocab_size 28.
"""

from __future__ import annotations

import json

from absl import app, flags

from deeprnn.config import CHOICES, parse_split
from deeprnn.data import sources, vocab
from deeprnn.errors import exit_on_usage_error, parse_flags_or_exit

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program, so that importing this module adds no flags."""
    flags.DEFINE_string("corpus", "time_machine", "Corpus spec: comma-separated names ("
                        + ", ".join(sources.NAMED_SOURCES) + "), gutenberg:<id>, file:<path>.")
    flags.DEFINE_string("data_dir", None, f"Read-only mirror of <name>.txt files, and of"
                        f" text8.zip/enwik8.zip or the unzipped text8/enwik8 (default"
                        f" ${sources.DATA_DIR_ENV}); used first, without network.")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS folder for downloads and prepared datasets"
                        " (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
    flags.DEFINE_enum("preprocess", "d2l", list(CHOICES["preprocess"]),
                      "d2l: letters only, lowercased (d2l 1.0); d2l_lines: the same per line,"
                      " lines glued (d2l 0.17); raw: every character.")
    flags.DEFINE_string("split", "0.9,0.05,0.05", "Train,validation,test fractions of each"
                        " document (contiguous parts); 1,0,0 for no held-out split.")
    flags.DEFINE_integer("max_tokens", 0, "Keep only the first N preprocessed characters"
                         " (d2l 0.17 trains on 10000); 0: all, as in deeprnn.train.")


def main(argv) -> None:
    del argv
    with exit_on_usage_error():
        documents = sources.load_documents(FLAGS.corpus, FLAGS.data_dir, FLAGS.tfds_data_dir)
        splits = vocab.build_splits(documents, FLAGS.preprocess, parse_split(FLAGS.split),
                                    FLAGS.max_tokens or None)
    print(json.dumps(sources.describe(FLAGS.corpus, splits, documents, FLAGS.preprocess),
                     ensure_ascii=False))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
