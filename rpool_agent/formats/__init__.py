"""Pool documents: canary flat, canary node form and the CTest resource spec."""
