"""WebShop (Yao et al., 2022) as a text environment: real goals, WebShop's pages, actions, reward.

Modules: ``products`` (records), ``goals`` (goal list and split), ``catalog`` (GENERATED pages
for the offline setting), ``search`` (BM25 via bm25s), ``engine`` (page state
machine and text rendering), ``reward`` (native score), ``env`` (the ``Env``), ``adapter``
(WebShop's own data files), ``prompts`` (step prompt). See ``docs/webshop.md``.
"""
from environments.webshop.adapter import (load_webshop_shop, make_webshop_env,
                                          make_webshop_env_from_files, webshop_data_files)
from environments.webshop.env import (MAX_STEPS, SUCCESS_REWARD, WebShopEnv, load_offline_shop,
                                      make_offline_webshop_env)
from environments.webshop.prompts import render_prompt

__all__ = ["MAX_STEPS", "SUCCESS_REWARD", "WebShopEnv", "load_offline_shop", "load_webshop_shop",
           "make_offline_webshop_env", "make_webshop_env", "make_webshop_env_from_files",
           "render_prompt", "webshop_data_files"]
