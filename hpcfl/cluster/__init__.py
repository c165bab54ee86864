"""Running on clusters: where ranks go (placement) and the sbatch scripts that put them there (render)."""
