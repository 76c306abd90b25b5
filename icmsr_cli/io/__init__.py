"""Files in and out: image decoding and encoding, batches of files, atomic writes."""
