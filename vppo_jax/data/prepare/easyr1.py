"""The EasyR1 training layout: one row per problem with `problem`, `answer` and `images` columns.

ViRL39K as the paper trained on it (chamber111/VPPO_ViRL39K_train) is published this way,
with the images embedded as HF datasets image structs ({"bytes", "path"}); it already is
our schema, so a row is taken as it is (docs/datasets.md#virl39k).
"""

from __future__ import annotations

from vppo_jax.data.prepare.example import Fields

COLUMNS = ("problem", "answer", "images")


def fields(row: dict) -> Fields:
    return Fields(problem=row.get("problem"), answer=row.get("answer"), images=row.get("images"))
