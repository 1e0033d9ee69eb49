"""`vitkit serve`: saved weights behind an HTTP service (FastAPI on uvicorn) with a page to try them in a browser.

options.py holds the command's options, batching.py gathers concurrent requests into batches, app.py is the
application (routes, upload limits, errors), page.html the page at /. FastAPI and uvicorn are imported only when
a server starts (`pip install 'vitkit[serve]'`).
"""

from __future__ import annotations

from vitkit.serve.options import ServeOptions

INSTALL_HINT = "vitkit serve needs fastapi, uvicorn and python-multipart: pip install 'vitkit[serve]'"


def build_app(opts: ServeOptions):
    """The FastAPI application serving `opts.weights` (for uvicorn, or a test client)."""
    opts.check()
    try:
        from vitkit.serve.app import create_app
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    from vitkit.inference import ImageClassifier

    # Requests are gathered into batches of up to max_batch: "auto" is timed at that batch.
    classifier = ImageClassifier(opts.weights, opts.precision, opts.compile, opts.device, opts.keep_freed_memory,
                                 batch_size=opts.max_batch, int8_calibration=opts.int8_calibration)
    if opts.compile:
        # Before the port opens: otherwise the first requests would wait for the compilation (40-60 s for S/16 on
        # 2 cores), and the first batch of another size for a second one.
        print("compiling the model for batch 1 and larger batches before serving ...", flush=True)
        classifier.warm_up((1, 2) if opts.max_batch > 1 else (1,))
    return create_app(classifier, opts)


def serve(opts: ServeOptions) -> None:
    """Serve until interrupted."""
    app = build_app(opts)
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    print(f"serving {opts.weights} in {app.state.precision} on http://{opts.host}:{opts.port}/ "
          "(POST /predict, POST /explain, GET /healthz; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level)


__all__ = ["INSTALL_HINT", "ServeOptions", "build_app", "serve"]
