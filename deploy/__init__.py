"""Deployment helpers: the container health probe and the offline manifest check.

`python -m deploy.check` lints the Dockerfile, renders every kustomize overlay and validates it
offline (kubernetes-validate, yamllint, checkov, and this project's own invariants).
"""
