"""A scripted policy for runs that must win and lose without a trained model: a random admissible
action, read from the prompt, rendered as the model's ReAct turn."""
import re

import numpy as np

from spear_jax.sampling import Generation

# The list runs to the line's final "]." (WebShop actions hold brackets: search[...], click[...]).
_ADMISSIBLE = re.compile(r"(?:admissible actions of the current situation are|Admissible actions): \[(.*)\]\.$",
                         re.M)


def admissible_turn(chat, prompt, rng: np.random.Generator) -> Generation:
    """One of the admissible actions listed in ``prompt`` (chosen by ``rng``) as a finished turn."""
    actions = re.findall(r"'([^']*)'", _ADMISSIBLE.search(chat.decode(prompt)).group(1))
    text = f"<think>go</think><action>{actions[rng.integers(len(actions))]}</action>"
    tokens = np.asarray(chat.encode(text) + list(chat.assistant_end_ids), np.int32)
    return Generation(tokens=tokens, logprobs=np.full(tokens.shape, -0.5, np.float32), finish_reason="stop")
