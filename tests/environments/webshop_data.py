"""Writes a WebShop ``data/`` folder (real file names and format) from the fixture records."""
import copy
import json
import os
import shutil

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "webshop")


def write_webshop_data_dir(data_dir, num_products: int = 260, human_goals: bool = False) -> str:
    """``items_shuffle_1000.json`` / ``items_ins_v2_1000.json`` with ``num_products`` variants of
    the fixture's body scrub (two sizes each, so two synthetic goals per product; a model word
    ``model<k>`` in title and instruction tells them apart); with ``human_goals`` also the
    fixture's ``items_human_ins.json``."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(FIXTURES, "items_shuffle_fixture.json")) as f:
        template = json.load(f)[0]
    items, attributes = [], {}
    for k in range(num_products):
        record = copy.deepcopy(template)
        record["asin"] = f"B{k:09d}"
        record["name"] = f"Lumina model{k} Tea Tree Body Scrub"
        record["customization_options"] = {"Size": [{"value": "8 Ounce", "image": None},
                                                    {"value": "16 Ounce", "image": None}]}
        items.append(record)
        attributes[record["asin"]] = {
            "attributes": ["tea tree"], "instruction": f"Find me model{k} body scrub with tea tree",
            "instruction_attributes": ["tea tree"]}
    with open(os.path.join(data_dir, "items_shuffle_1000.json"), "w") as f:
        json.dump(items, f)
    with open(os.path.join(data_dir, "items_ins_v2_1000.json"), "w") as f:
        json.dump(attributes, f)
    if human_goals:
        shutil.copy(os.path.join(FIXTURES, "items_human_ins_fixture.json"),
                    os.path.join(data_dir, "items_human_ins.json"))
    return str(data_dir)
