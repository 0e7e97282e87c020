"""Servers the node starts and owns itself on a single host: a private Redis and an Orthanc.

``openmsk up`` uses them when no external Redis or Orthanc is configured, and the tests use the very same
classes to run real peers on free ports.
"""
