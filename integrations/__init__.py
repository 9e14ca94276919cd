"""Integrations of the largevocab core with model libraries (Hugging Face causal LMs, SASRec).

Installed as ``largevocab.integrations``; the core package never imports from here.
"""
