"""Data: from a corpus spec to token ids and batches.

`sources` names the corpora and reads each one from a local mirror, the copy shipped in the
package (The Time Machine, `texts/`), a prepared TFDS dataset (`tfds_text`) or its canonical
download, checksum-verified; `benchmarks` reads text8 and enwik8 from their zips with their
standard split; `vocab` applies the book's preprocessing rules, builds the character vocabulary
and cuts every document into contiguous train / validation / test parts; `samplers` serves
d2l's random and sequential batches as a pure function of (seed, step), and the evaluation
streams that read a split exactly once.
"""
