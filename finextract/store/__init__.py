"""The run-folder store: how finextract lays out and writes its output folders, each thing in one place.

- `folders`: one run per output folder: `prepare` checks `--out` once (the `RunFolder` it returns is
  passed on, not checked again); `stage` / `commit` replace a run's outputs whole; `write_record`
  writes result.json atomically; `recorded_extracted` reads back what a record names.
- `chunks`: a resumable generation's folder: its manifest, chunk files, PNGs and lock; the one writer
  (`finextract.generation`) and reader (`finextract.images.read_images`, the fleet) of that format.
- `files`: files written whole: JSON and PNG written atomically, JSON values compared.

No torch: `import finextract.store.folders` (or `chunks`, `files`) loads numpy and the standard library only.
"""
