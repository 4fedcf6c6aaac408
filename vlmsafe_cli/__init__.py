"""vlmsafe: what compression does to the safety and the internal mechanisms of VLMs and chat LLMs."""

__version__ = "0.1.0"
