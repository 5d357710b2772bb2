"""``isif serve``: a local search page and JSON API over an embed folder (``app.serve``; see ``app``)."""
