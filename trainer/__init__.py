"""The model and how it learns (paper sections 3 and 4.2).

- :mod:`trainer.spec`: the model's inputs, derived from the transform output and the config;
- :mod:`trainer.model`: the wide and deep towers, joint training with one optimizer per tower;
- :mod:`trainer.data`: input pipelines over the datagen output;
- :mod:`trainer.train`: :func:`trainer.train.train`, checkpoints, resume, evaluation, export;
- :mod:`trainer.warmstart`: starting a model from the previous one across vocabulary versions;
- :mod:`trainer.export`: the SavedModel, its signatures and warmup requests;
- :mod:`trainer.metrics`: plots of the ROC and learning curves (the metrics themselves are
  :mod:`transform.metrics`).
"""
