"""contralateral.pipelines: planning and Dask execution of builds, and end-to-end jobs (demo, study)."""
