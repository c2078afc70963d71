"""Loss functions `(model, batch, num_items, **options) -> loss tensor` (sum over items / num_items), one module
per family. Each agent (crb/tasks/) names the ones that fit its batches; crb.tasks.LOSSES holds them all by the
name a recipe's `[[losses]]` gives."""
