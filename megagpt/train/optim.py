"""The optimizer's parameter groups: one rule for pretraining and finetuning."""
from megagpt.parallel.layout import named_parameters_serial


def _named_parameters(model):
    """(name, parameter): the GPT's under its serial names in any layout, and for a model wrapping one
    as ``.gpt`` (``FinetuneModel``) the GPT's the same way, then the wrapper's own (``head.weight``)."""
    model = getattr(model, "module", model)          # a DeepSpeed engine, or a model
    gpt = getattr(model, "gpt", None)
    if gpt is None:
        return named_parameters_serial(model)
    inner = named_parameters_serial(gpt)
    seen = {id(p) for _, p in inner}
    return inner + [(n, p) for n, p in model.named_parameters() if id(p) not in seen]


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups for pretraining and finetuning alike: decay matmul weights (the head's too), not biases,
    norm gains or embedding tables (lookups: decaying them would shrink rare tokens' rows each step they
    are not seen; GPT-1's code did). Serial GPT names, so the groups do not depend on the layout."""
    decay, no_decay = [], []
    for name, p in _named_parameters(model):
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("embed.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
