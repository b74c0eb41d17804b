"""Where in the brain a model's output comes from: voxelwise attribution maps of a registered `VolumeModel`
(Integrated Gradients, LRP, Guided Grad-CAM, occlusion, all through captum), their sanity checks
(completeness, model randomisation), scores against a ground-truth map, and NIfTI output in MNI space.

Modules: `heatmaps` (the maps and their checks), `score` (maps against a truth map; the Haufe pattern of a
linear model), `nifti` (writing maps with the model's affine; group averages), `regions` (an autoencoder's
latent dimensions mapped to brain regions by perturbation and decoding), `run` (the `endopheno attribute`
step: registry model in, maps, checks, scores, figures and the latent-to-region table out).
"""
