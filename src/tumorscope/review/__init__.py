"""The review loop: answers kept for a radiologist's reading (``queue``), readings turned into a
labelled batch the pipeline trains on (``harvest``), and Label Studio's formats (``labelstudio``)."""
