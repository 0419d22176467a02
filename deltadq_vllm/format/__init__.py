"""The delta artifact format (docs/format.md): the manifest and data file (`artifact`,
`artifact_files`, `artifact_writer`), per-tensor layouts (`layouts`), regenerated positions
(`positions`), quantization (`quant`), bit packing (`bitpack`), and the reference
reconstruction base + delta (`reconstruct`). The rest of the package (CLI, serving, vLLM
glue) reads and writes artifacts only through these modules."""
