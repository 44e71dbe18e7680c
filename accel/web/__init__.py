"""`accel app`: the Gradio web app. The page (`page`), a run (`run`), stopping (`stop`), history (`history`),
the technique knobs (`controls`), the request limits (`limits`), the work itself (`engine`, which knows nothing
of gradio), and serving a model on GPUs or a parallel worker group (`serve`, `group`)."""
