"""Studies on disk -> privacy-aware manifest -> MONAI datasets."""

import logging
import warnings

# MONAI's LoadImage instantiates every reader it knows, including the GPU nvImageCodec DICOM
# reader, which announces on every construction that nvImageCodec is absent. medtl reads DICOM
# with pydicom itself (see dicom.py), so the notice is noise for our users: silence just it.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
