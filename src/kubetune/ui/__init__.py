"""``kubetune ui``: compare a run's models side by side in a browser.

The package is split so that everything but the page layout can be tested without a browser or Gradio:

    backend   the run (its recipe and finished stages), its evaluation rows, the pool of loaded models,
              greedy answers with latency and tokens/s, and each answer's SQL executed and judged
    memory    GPU memory per device from NVML ("no GPU" without it), host RSS, glibc heap trimming
    views     HTML for the answers and the memory panel (pure functions of the backend's results)
    settings  where to listen and who may enter: flags, KUBETUNE_UI_* variables, Cloudera ML's port
    app       the Gradio layout and launch (the only module that imports gradio)
"""
