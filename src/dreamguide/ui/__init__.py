"""``dreamguide ui``: a local web app to personalize a subject and compare guidance modes side by side.

The app is a thin Gradio layer over the same Python API the command line uses, so every
setting is validated by the same code and a bad one gets the same message, shown next to its
field. The modules, in the order data flows:

    forms          form values -> ``SampleSettings`` / ``TrainConfig``; bad values -> ``FieldErrors``
                   (field -> the command line's message)
    training_job   a fine-tuning run in a background thread: progress, loss, periodic samples,
                   cancel (a checkpoint) and resume
    scores         identity and text alignment per image: the toy world's evaluators, or
                   ``dreamguide.metrics`` for real models when reference photos are known
    plots          Consistency_p per denoising step per mode; the identity / text trade-off
    workspace      the model in use, its subject and adapter, ``compare`` (sample the same seeds
                   in several modes, save PNGs with their settings, score, plot) and training
    views          the comparison grid and the training progress as HTML
    app            the Gradio page (imports gradio; nothing else here does)

Without ``--model`` the app works on the miniature world (``dreamguide.toyworld``): its bundled
base model, subjects and adapter, on a CPU and offline. Gradio is an optional extra
(``pip install -e ".[ui]"``). See docs/UI.md.
"""
