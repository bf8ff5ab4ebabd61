"""The annotation web app: people label pairs from the preference store in a browser.

Flask is imported only by :mod:`alignkit.feedback.annotate.app`, so importing this package is cheap.
"""
