"""Radiograph inputs: decoding, manifests of image layouts, and the decoded-image cache."""
