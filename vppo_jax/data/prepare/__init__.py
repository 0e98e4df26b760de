"""Converting ViRL39K and the paper's eight benchmarks, as published on the Hugging Face hub,
into the files vppo_jax/data reads: `python -m vppo_jax.data.prepare` (__main__.py).

    registry.py     NAME -> dataset: hub id, data and image files, row layout
    sources.py      --src -> the data files and their rows; the columns checked up front
    easyr1.py       the row layout of ViRL39K (problem, answer, images)
    sharegpt.py     the row layout of the PAPO evaluation suite (messages, images)
    example.py      a row -> our row, or a counted skip; images embedded
    image_files.py  the image files rows name, loose or in zip archives
    writer.py       the output parquet and report, renamed into place when complete
    convert.py      the run: rows -> output, counts, report
"""
